//! The agent protocol decoder: hello frames, frame lengths and frames, from
//! either side; nothing may panic and nothing unauthenticated may decode.
#![no_main]

use fep_shared::protocol::{self, AgentMsg, FepMsg, Key, Session, HELLO_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= HELLO_LEN {
        let hello: [u8; HELLO_LEN] = data[..HELLO_LEN].try_into().expect("sized");
        let _ = protocol::parse_hello(&hello);
    }
    if data.len() >= 4 {
        let _ = Session::check_len(u32::from_be_bytes(data[..4].try_into().expect("sized")));
    }
    let key = Key::from_hex(&"42".repeat(32)).expect("valid key");
    let mut fep_side = Session::new(key.clone(), [1; 16], [2; 16]);
    assert!(fep_side.open::<AgentMsg>(data).is_err(), "a frame without the key's MAC was accepted");
    let mut agent_side = Session::new(key, [2; 16], [1; 16]);
    assert!(agent_side.open::<FepMsg>(data).is_err(), "a frame without the key's MAC was accepted");
});
