//! A framework's ACCEPT from the wire: decoded and checked at the edge as the master's
//! scheduler service does (offer ids, operations with their tasks, filters). Nothing may
//! panic.
#![no_main]

use agora_proto::v1;
use prost::Message;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(r) = v1::AcceptRequest::decode(data) else {
        return;
    };
    let _ = agora_master::validate::offer_ids(&r.offer_ids);
    let _ = agora_master::validate::operations(&r.operations);
    let _ = agora_master::validate::filters("filters", r.filters.as_ref());
    for op in &r.operations {
        if let Some(v1::operation::Operation::Launch(l)) = &op.operation {
            for t in &l.tasks {
                if agora_master::validate::task_info("task", t).is_ok() {
                    let _ = agora_proto::resources_from_proto(&t.resources);
                }
            }
        }
    }
});
