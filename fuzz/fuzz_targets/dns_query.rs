//! The DNS server's answers: arbitrary bytes as a UDP query; nothing may
//! panic, and every reply is a well-formed response to the query's ID
//! that fits a plain UDP datagram unless the query offered more (EDNS).
#![no_main]

use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(reply) = fep::testing::dns_answer(data) else {
        return;
    };
    let m = Message::from_vec(&reply).expect("fep's reply parses");
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(m.metadata.id, u16::from_be_bytes([data[0], data[1]]));
    assert!(reply.len() <= 1232, "a {}-byte UDP reply", reply.len());
});
