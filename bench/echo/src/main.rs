//! A bare axum JSON echo of the broker's hot request, the physical reference of `bench/throughput.sh`:
//! `POST /v1/credentials` parses the same `CredentialRequest` body with the same axum, hyper and tokio
//! (multi-threaded runtime, default worker count, as `botcreds serve`) and answers it back as JSON. No
//! identity, policy, audit or disk: what is left is what any JSON-over-HTTP/1.1 server must pay.
//!
//!   botcreds-bench-echo 127.0.0.1:18444

use axum::Json;
use axum::Router;
use axum::routing::post;
use botcreds_proto::CredentialRequest;

async fn echo(Json(request): Json<CredentialRequest>) -> Json<CredentialRequest> {
    Json(request)
}

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18444".to_owned());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        eprintln!("echo listening on {}", listener.local_addr()?);
        let app = Router::new().route("/v1/credentials", post(echo));
        axum::serve(listener, app).await
    })
}
