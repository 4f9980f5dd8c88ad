//! A Mesos framework's call from the wire (`POST /api/v1/scheduler`): read as JSON and as
//! protobuf, then turned into the agora.v1 call it means, as the master's Mesos endpoint
//! does; written out again in both encodings. Nothing may panic.
#![no_main]

use agora_mesos::codec::{self, Format};
use agora_mesos::convert;
use agora_mesos::v1::scheduler;

fn serve(call: &scheduler::Call) {
    if let Some(s) = &call.subscribe {
        let _ = convert::framework_info(&s.framework_info);
    }
    if let Some(a) = &call.accept {
        let _ = convert::operations(&a.operations);
        let _ = convert::filters(a.filters.as_ref());
    }
    let _ = codec::encode(Format::Json, call);
    let _ = codec::encode(Format::Protobuf, call);
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(call) = codec::decode::<scheduler::Call>(Format::Json, data) {
        serve(&call);
    }
    if let Ok(call) = codec::decode::<scheduler::Call>(Format::Protobuf, data) {
        serve(&call);
    }
    let mut reader = agora_mesos::recordio::Reader::new(1 << 16);
    reader.push(data);
    while let Ok(Some(_)) = reader.next_record() {}
});
