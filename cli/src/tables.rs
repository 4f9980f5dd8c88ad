//! `agora agents` and `agora tasks`: tables from the operator API.

use agora_core::Resources;
use agora_proto::{reason_name, resources_from_proto, state_from_proto, v1};
use agora_sdk::Operator;

use crate::{QueryArgs, master_url};

/// Left-aligned columns, two spaces apart.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn res(r: &[v1::Resource]) -> Resources {
    resources_from_proto(r).unwrap_or_default()
}

fn fmt(v: f64) -> String {
    agora_core::Scalar::from_f64(v)
        .map(|s| s.to_string())
        .unwrap_or_else(|_| format!("{v}"))
}

pub async fn agents(args: &QueryArgs) -> anyhow::Result<()> {
    let state = Operator::connect(&master_url(&args.master))
        .await?
        .state()
        .await?;
    let rows: Vec<Vec<String>> = state
        .agents
        .iter()
        .map(|a| {
            let (total, used, offered) = (res(&a.total), res(&a.used), res(&a.offered));
            let info = a.info.clone().unwrap_or_default();
            let reserved: Vec<String> = total
                .reserved_roles()
                .into_iter()
                .map(|role| format!("{role}:{}", total.reserved_for(role)))
                .collect();
            vec![
                a.id.as_ref().map(|i| i.value.clone()).unwrap_or_default(),
                info.hostname,
                // The master's word when it gives one: connected, disconnected (its link
                // dropped, not yet timed out), recovering (expected back after a failover)
                // or unreachable.
                match a.status.as_str() {
                    "connected" => "active".into(),
                    "" if a.active => "active".into(),
                    "" => "inactive".into(),
                    other => other.to_owned(),
                },
                format!("{}/{}", fmt(used.cpus()), fmt(total.cpus())),
                format!("{}/{}", fmt(used.mem()), fmt(total.mem())),
                format!("{}/{}", fmt(used.disk()), fmt(total.disk())),
                format!("{}/{}", fmt(offered.cpus()), fmt(offered.mem())),
                if reserved.is_empty() {
                    "-".into()
                } else {
                    reserved.join(" ")
                },
                info.endpoint,
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "HOSTNAME",
            "STATUS",
            "CPUS(used/total)",
            "MEM(MiB)",
            "DISK(MiB)",
            "OFFERED(cpus/mem)",
            "RESERVED",
            "ENDPOINT",
        ],
        &rows,
    );
    Ok(())
}

pub async fn tasks(args: &QueryArgs, all: bool, usage: bool) -> anyhow::Result<()> {
    let state = Operator::connect(&master_url(&args.master))
        .await?
        .state()
        .await?;
    // Usage comes from each agent, for the tasks running there now.
    let mut live: std::collections::HashMap<(String, String), v1::TaskUsage> =
        std::collections::HashMap::new();
    if usage {
        for a in &state.agents {
            let Some(endpoint) = a.info.as_ref().map(|i| i.endpoint.clone()) else {
                continue;
            };
            match agora_sdk::agent_containers(&endpoint).await {
                Ok(cs) => {
                    for c in cs {
                        let key = (
                            c.framework_id.map(|f| f.value).unwrap_or_default(),
                            c.task_id.map(|t| t.value).unwrap_or_default(),
                        );
                        live.insert(key, c.usage.unwrap_or_default());
                    }
                }
                Err(e) => eprintln!("agora: usage from {endpoint}: {e}"),
            }
        }
    }
    let mut records = state.tasks;
    if all {
        records.extend(state.completed_tasks);
    }
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|t| {
            let r = res(&t.resources);
            let status = t.last_status.clone().unwrap_or_default();
            let detail = match (status.reason(), status.message.lines().next()) {
                (v1::Reason::Unspecified, Some(m)) => m.to_owned(),
                (v1::Reason::Unspecified, None) => String::new(),
                (reason, m) => format!("{}: {}", reason_name(reason), m.unwrap_or_default()),
            };
            let mut row = vec![
                t.task_id
                    .as_ref()
                    .map(|i| i.value.clone())
                    .unwrap_or_default(),
                t.name.clone(),
                state_from_proto(t.state())
                    .map_or("?", |s| s.name())
                    .to_owned(),
                t.framework_id
                    .as_ref()
                    .map(|i| i.value.clone())
                    .unwrap_or_default(),
                t.agent_id
                    .as_ref()
                    .map(|i| i.value.clone())
                    .unwrap_or_default(),
                fmt(r.cpus()),
                fmt(r.mem()),
                detail,
            ];
            if usage {
                let key = (
                    t.framework_id
                        .as_ref()
                        .map(|i| i.value.clone())
                        .unwrap_or_default(),
                    t.task_id
                        .as_ref()
                        .map(|i| i.value.clone())
                        .unwrap_or_default(),
                );
                let cells = match live.get(&key) {
                    Some(u) => vec![
                        format!("{:.2}", u.cpu_seconds),
                        format!("{:.1}", u.mem_bytes as f64 / 1048576.0),
                        format!("{:.1}", u.mem_peak_bytes as f64 / 1048576.0),
                        u.pids.to_string(),
                    ],
                    None => vec!["-".into(); 4],
                };
                // Usage goes before the free-text detail column.
                let detail = row.pop().unwrap_or_default();
                row.extend(cells);
                row.push(detail);
            }
            row
        })
        .collect();
    let mut header = vec!["ID", "NAME", "STATE", "FRAMEWORK", "AGENT", "CPUS", "MEM"];
    if usage {
        header.extend(["CPU(S)", "MEM(MIB)", "PEAK(MIB)", "PIDS"]);
    }
    header.push("DETAIL");
    print_table(&header, &rows);
    Ok(())
}

pub async fn roles(args: &QueryArgs) -> anyhow::Result<()> {
    let roles = Operator::connect(&master_url(&args.master))
        .await?
        .roles()
        .await?;
    let show = |r: &[v1::Resource]| {
        let r = res(r);
        if r.is_empty() {
            "-".to_owned()
        } else {
            r.to_string()
        }
    };
    let rows: Vec<Vec<String>> = roles
        .iter()
        .map(|r| {
            vec![
                r.role.clone(),
                fmt(r.weight),
                show(&r.guarantee),
                show(&r.limit),
                show(&r.allocated),
                show(&r.offered),
                show(&r.reserved),
                r.frameworks.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "ROLE",
            "WEIGHT",
            "GUARANTEE",
            "LIMIT",
            "ALLOCATED",
            "OFFERED",
            "RESERVED",
            "FRAMEWORKS",
        ],
        &rows,
    );
    Ok(())
}
