//! The broker's persistent state lives in the `botcreds-store` crate (the only crate that depends on sled);
//! this module keeps its paths (`crate::store::SledStore`, …) for the rest of the broker.

pub use botcreds_store::*;
