//! The DNS server's answers: arbitrary bytes as a UDP query; nothing may
//! panic, every reply is a well-formed response to the query's ID that
//! fits a UDP datagram, and the server (its fast path for common queries)
//! answers exactly as its general path does.
#![no_main]

use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (served, general) = fep::testing::dns_answers(data);
    let Some(general) = general else {
        assert!(served.is_empty(), "an answer where the general path has none");
        return;
    };
    let m = Message::from_vec(&served).expect("fep's reply parses");
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(m.metadata.id, u16::from_be_bytes([data[0], data[1]]));
    assert!(served.len() <= 1232, "a {}-byte UDP reply", served.len());
    assert_eq!(m, Message::from_vec(&general).expect("the general reply parses"));
});
