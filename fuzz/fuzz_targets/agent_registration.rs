//! An agent's first message from the wire: decoded, checked at the edge as the master's
//! agent link does, then registered with an engine. Nothing may panic.
#![no_main]

use std::time::{Duration, Instant};

use agora_master::engine::{Engine, EngineConfig, Now};
use agora_proto::v1;
use prost::Message;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(msg) = v1::AgentMessage::decode(data) else {
        return;
    };
    let Some(v1::agent_message::Message::Register(reg)) = msg.message else {
        return;
    };
    if agora_master::validate::registration(&reg).is_err() {
        return;
    }
    let config = EngineConfig {
        master_id: "fuzz".into(),
        agent_heartbeat_interval: Duration::from_secs(1),
        max_missed_heartbeats: 3,
        framework_heartbeat_interval: Duration::from_secs(15),
        default_refuse: Duration::from_secs(5),
        offer_timeout: None,
        reservers: Default::default(),
        max_completed_tasks: 100,
        agent_reregister_timeout: Duration::from_secs(60),
        acls: None,
        max_tasks_per_principal: 0,
        max_offers_per_principal: 0,
    };
    let allocator = agora_master::allocator::HierarchicalDrf::new(
        agora_core::parse_resources("cpus:0.01;mem:32").unwrap(),
    );
    let mut engine = Engine::new(config, Box::new(allocator));
    let now = Now {
        mono: Instant::now(),
        wall: 1.0e9,
    };
    let _ = engine.register_agent(reg, now);
});
