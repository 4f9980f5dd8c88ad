//! `agora quota` and `agora weight`: changing roles through the operator API.

use agora_sdk::Operator;
use anyhow::Context;
use clap::Subcommand;

use crate::{QueryArgs, master_url, parse_resources};

#[derive(Subcommand)]
pub enum QuotaAction {
    /// Set ROLE's quota: what it is guaranteed and what it may never exceed.
    Set {
        role: String,
        /// e.g. 'cpus:8;mem:16384'.
        #[arg(long, value_parser = parse_resources)]
        guarantee: Option<agora_core::Resources>,
        /// e.g. 'cpus:16'; scalars not named are unlimited.
        #[arg(long, value_parser = parse_resources)]
        limit: Option<agora_core::Resources>,
        /// Accept a guarantee larger than the cluster holds now.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        query: QueryArgs,
    },
    /// Remove ROLE's quota.
    Remove {
        role: String,
        #[command(flatten)]
        query: QueryArgs,
    },
}

#[derive(Subcommand)]
pub enum WeightAction {
    /// Set ROLE's weight (default 1): its fair share is proportional to it.
    Set {
        role: String,
        weight: f64,
        #[command(flatten)]
        query: QueryArgs,
    },
}

pub async fn quota(action: QuotaAction) -> anyhow::Result<()> {
    match action {
        QuotaAction::Set {
            role,
            guarantee,
            limit,
            force,
            query,
        } => {
            if guarantee.is_none() && limit.is_none() {
                anyhow::bail!("give --guarantee, --limit or both (or use `agora quota remove`)");
            }
            let op = Operator::connect(&master_url(&query.master)).await?;
            op.set_quota(&role, &guarantee.unwrap_or_default(), limit.as_ref(), force)
                .await
                .with_context(|| format!("setting the quota of {role}"))?;
            println!("quota of {role} set");
        }
        QuotaAction::Remove { role, query } => {
            let op = Operator::connect(&master_url(&query.master)).await?;
            op.set_quota(&role, &agora_core::Resources::new(), None, false)
                .await
                .with_context(|| format!("removing the quota of {role}"))?;
            println!("quota of {role} removed");
        }
    }
    Ok(())
}

pub async fn weight(action: WeightAction) -> anyhow::Result<()> {
    let WeightAction::Set {
        role,
        weight,
        query,
    } = action;
    let op = Operator::connect(&master_url(&query.master)).await?;
    op.set_weight(&role, weight)
        .await
        .with_context(|| format!("setting the weight of {role}"))?;
    println!("weight of {role} set to {weight}");
    Ok(())
}
