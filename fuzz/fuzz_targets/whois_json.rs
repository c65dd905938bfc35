//! tailscaled's WhoIs answer, parsed by the broker into a caller identity: never panics.
#![no_main]

use botcreds_broker::identity::tailnet::parse_whois;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_whois(data);
});
