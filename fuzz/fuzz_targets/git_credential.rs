//! git's credential-helper protocol as the helper and the agent read it: never panics, and
//! whatever parses encodes to something that parses back to the same description.
#![no_main]

use botcreds_proto::git_credential::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(description) = parse(data) else {
        return;
    };
    if let Ok(encoded) = description.encode() {
        let again = parse(&encoded).expect("an encoded description parses");
        assert_eq!(again, description, "encode/parse round trip changed the description");
    }
});
