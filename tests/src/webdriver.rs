//! A small W3C WebDriver client for end-to-end tests in a real headless Chromium: starts
//! Debian's `chromedriver` (which starts `/usr/bin/chromium`) and speaks the WebDriver HTTP
//! protocol to it with reqwest — navigate, find by CSS selector, click, type, read text.
//!
//! `tests/run` installs `chromium` and `chromium-driver` when they are missing.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Where Debian installs them.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// The key WebDriver names element references by.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A WebDriver error answer (`{"value": {"error": ..., "message": ...}}`) or a transport failure.
#[derive(Debug)]
pub struct WebDriverError {
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.message)
    }
}

/// A running chromedriver; dropping it kills its whole process group, browsers included (a
/// test that panicked never closed its session).
pub struct ChromeDriver {
    child: Child,
    url: String,
    profile: tempfile::TempDir,
}

impl ChromeDriver {
    /// Start chromedriver on a free loopback port; returns once it says it listens.
    pub async fn start() -> ChromeDriver {
        assert!(
            Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists(),
            "{CHROMEDRIVER} and {CHROMIUM} are needed (apt-get install chromium chromium-driver; \
             tests/run installs them)"
        );
        let mut child = Command::new(CHROMEDRIVER)
            .arg("--port=0")
            // Its own process group, so that Drop can end the browsers it started too.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting chromedriver");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let port = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                // "ChromeDriver was started successfully on port 40721."
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    return rest.trim_end_matches('.').trim().parse::<u16>().ok();
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .expect("chromedriver reports its port");
        // Keep reading so chromedriver never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ChromeDriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            profile: tempfile::tempdir().expect("profile dir"),
        }
    }

    /// A new headless browser session with an empty profile.
    pub async fn session(&self) -> Session {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .no_proxy()
            .build()
            .expect("client");
        let profile = self.profile.path().join(uuid_like());
        // Flags as the machine notes say: no sandbox as root, and no background networking on
        // a closed network.
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".to_string(),
            "--disable-gpu".to_string(),
            "--disable-dev-shm-usage".to_string(),
            "--disable-quic".to_string(),
            "--no-first-run".to_string(),
            "--disable-background-networking".to_string(),
            "--disable-component-update".to_string(),
            "--disable-sync".to_string(),
            "--disable-crash-reporter".to_string(),
            "--disable-breakpad".to_string(),
            "--window-size=1280,900".to_string(),
            format!("--user-data-dir={}", profile.display()),
        ];
        let body = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let answer = call(
            &client,
            reqwest::Method::POST,
            &format!("{}/session", self.url),
            Some(body),
        )
        .await
        .unwrap_or_else(|e| panic!("creating a browser session: {e}"));
        let id = answer["sessionId"]
            .as_str()
            .expect("session id")
            .to_string();
        Session {
            client,
            base: format!("{}/session/{id}", self.url),
        }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            // The group's id is chromedriver's pid (process_group(0) above).
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn uuid_like() -> String {
    format!("p{:016x}", rand::random::<u64>())
}

async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> Result<Value, WebDriverError> {
    let mut request = client.request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.map_err(|e| WebDriverError {
        error: "transport".into(),
        message: e.to_string(),
    })?;
    let status = response.status();
    let value: Value = response.json().await.map_err(|e| WebDriverError {
        error: "bad answer".into(),
        message: e.to_string(),
    })?;
    let value = value.get("value").cloned().unwrap_or(Value::Null);
    if status.is_success() {
        Ok(value)
    } else {
        Err(WebDriverError {
            error: value["error"].as_str().unwrap_or("unknown").to_string(),
            message: value["message"].as_str().unwrap_or("").to_string(),
        })
    }
}

/// One browser session.
pub struct Session {
    client: reqwest::Client,
    base: String,
}

/// A reference to an element of the current page.
#[derive(Clone, Debug)]
pub struct Element(String);

impl Session {
    async fn cmd(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WebDriverError> {
        call(&self.client, method, &format!("{}{path}", self.base), body).await
    }

    /// How long `find` waits for a matching element to appear (WebDriver's implicit wait),
    /// so a test waits for the next page without sleeping.
    pub async fn set_implicit_wait(&self, wait: Duration) -> Result<(), WebDriverError> {
        self.cmd(
            reqwest::Method::POST,
            "/timeouts",
            Some(json!({ "implicit": wait.as_millis() as u64 })),
        )
        .await
        .map(|_| ())
    }

    /// Navigate and wait for the page to load (WebDriver's default page-load strategy).
    pub async fn goto(&self, url: &str) -> Result<(), WebDriverError> {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await
            .map(|_| ())
    }

    pub async fn current_url(&self) -> Result<String, WebDriverError> {
        let v = self.cmd(reqwest::Method::GET, "/url", None).await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    pub async fn title(&self) -> Result<String, WebDriverError> {
        let v = self.cmd(reqwest::Method::GET, "/title", None).await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// The page's current DOM as HTML.
    pub async fn source(&self) -> Result<String, WebDriverError> {
        let v = self.cmd(reqwest::Method::GET, "/source", None).await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// The first element matching a CSS selector (`no such element` when there is none).
    pub async fn find(&self, css: &str) -> Result<Element, WebDriverError> {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        v[ELEMENT_KEY]
            .as_str()
            .map(|id| Element(id.to_string()))
            .ok_or_else(|| WebDriverError {
                error: "bad answer".into(),
                message: format!("no element reference in {v}"),
            })
    }

    /// Every element matching a CSS selector.
    pub async fn find_all(&self, css: &str) -> Result<Vec<Element>, WebDriverError> {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT_KEY].as_str().map(|id| Element(id.to_string())))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Click like a user; a click that submits a form returns after the next page loaded.
    pub async fn click(&self, element: &Element) -> Result<(), WebDriverError> {
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{}/click", element.0),
            Some(json!({})),
        )
        .await
        .map(|_| ())
    }

    /// Type into an input or textarea.
    pub async fn send_keys(&self, element: &Element, text: &str) -> Result<(), WebDriverError> {
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{}/value", element.0),
            Some(json!({ "text": text })),
        )
        .await
        .map(|_| ())
    }

    /// The rendered text of an element.
    pub async fn text(&self, element: &Element) -> Result<String, WebDriverError> {
        let v = self
            .cmd(
                reqwest::Method::GET,
                &format!("/element/{}/text", element.0),
                None,
            )
            .await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// An attribute of an element (`None` when absent).
    pub async fn attribute(
        &self,
        element: &Element,
        name: &str,
    ) -> Result<Option<String>, WebDriverError> {
        let v = self
            .cmd(
                reqwest::Method::GET,
                &format!("/element/{}/attribute/{name}", element.0),
                None,
            )
            .await?;
        Ok(v.as_str().map(str::to_string))
    }

    /// A PNG of the viewport (for looking at a page when a test fails).
    pub async fn screenshot(&self) -> Result<Vec<u8>, WebDriverError> {
        use base64::Engine;
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await?;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .map_err(|e| WebDriverError {
                error: "bad answer".into(),
                message: e.to_string(),
            })
    }

    /// End the session (closes the browser).
    pub async fn close(self) {
        let _ = self.cmd(reqwest::Method::DELETE, "", None).await;
    }
}
