//! LiteLLM virtual keys for `[[litellm]]` entries: fetched from the broker, cached on disk like
//! GitHub tokens, written to the entry's files (see [`crate::outputs`]), refreshed ahead of
//! expiry, checked regularly so that a revocation or rotation on the broker reaches the files,
//! removed from the files when the key dies, and released at the broker when the agent stops.
//!
//! One task per entry sleeps until its next deadline: refresh (a share of the key's lifetime
//! before expiry), check (`check_interval`), retry after a failure, or expiry. While the broker
//! is down the files stay as they are until the key's own expiry, also across agent restarts.

mod files;
mod key;
mod on_change;
mod plan;
mod status;
mod task;

pub use key::{Key, KeyRecord, KeyState, KeyValue, cache_file_name, plain_base_url};
pub use on_change::{MAX_ON_CHANGE_CAPTURE, ON_CHANGE_ENV, run_command};
pub use plan::{MAX_DEFAULT_WINDOW, MIN_WINDOW, Plan, Step, next_step, refresh_at, refresh_window};
pub use status::{LITELLM_STATUS_PATH, LitellmKeyStatus, OnChangeStatus, OutputStatus, routes};
pub use task::Litellm;
