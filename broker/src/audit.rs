//! The durable, group-committed audit log lives in the `botcreds-store` crate next to the store it writes;
//! this module keeps its paths (`crate::audit::AuditLog`, …) for the rest of the broker.

pub use botcreds_store::audit::*;
