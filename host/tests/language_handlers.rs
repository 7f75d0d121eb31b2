//! The example config-file handlers in Python, JavaScript (componentize-js
//! and QuickJS) and C, built from `examples/handlers` with their own
//! toolchains, through the same host, lifecycle, sandbox and audit as the
//! first-party handlers. Each test runs against every language's build.

mod common;

use std::path::{Path, PathBuf};

use common::failed;
use common::languages::{self, Language};
use otabox::capabilities::DeviceGrant;
use otabox::runtime::{Handler, Runtime};
use otabox::step::{StepReport, StepRequest, StepResult, run_step};
use serde_json::{Value, json};

const UPDATE_TYPE: &str = "example/config-file:1";

/// A language's handler loaded with `/etc/example` placed in `etc`.
struct Rig {
    _dir: tempfile::TempDir,
    root: PathBuf,
    etc: PathBuf,
    handler: Handler,
}

async fn rig(language: Language) -> Option<Rig> {
    let built = language.build()?;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let handlers = root.join("handlers");
    std::fs::create_dir_all(&handlers).expect("handlers");
    for file in ["config-file.wasm", "config-file.toml"] {
        std::fs::copy(built.join(file), handlers.join(file)).expect("copy the build");
    }
    let etc = root.join("etc-example");
    let grant = DeviceGrant {
        mounts: [(PathBuf::from("/etc/example"), etc.clone())].into(),
        ..DeviceGrant::default()
    };
    let handler = Runtime::new(Some(languages::compiled_cache()))
        .expect("runtime")
        .load_handler(&handlers.join("config-file.toml"), Some(&grant))
        .await
        .unwrap_or_else(|e| panic!("{}: load: {e:#}", language.name()));
    Some(Rig {
        _dir: dir,
        root,
        etc,
        handler,
    })
}

impl Rig {
    async fn deploy(&self, job: &str, manifest: Value) -> StepReport {
        let request = StepRequest {
            job_id: job.into(),
            step: 0,
            update_type: UPDATE_TYPE.into(),
            manifest: manifest.to_string(),
            payloads: Vec::new(),
            job_dir: self.root.join("jobs").join(job),
            cancel: Default::default(),
        };
        run_step(&self.handler, request, None).await.expect("step")
    }

    fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.etc.join(name)).ok()
    }
}

fn config(version: &str, content: &str) -> Value {
    json!({"path": "/etc/example/app.conf", "version": version, "content": content})
}

fn installed(language: Language, report: &StepReport) {
    assert!(
        matches!(report.result, StepResult::Installed { .. }),
        "{}: {:?}\n{:?}",
        language.name(),
        report.result,
        report.phases
    );
}

/// Install, skip when installed, refuse an invalid file, roll back a failed
/// reload (restoring the old file, or removing a new one).
async fn lifecycle(language: Language) {
    let Some(r) = rig(language).await else { return };
    let lang = language.name();
    const V1: &str = "# pump settings\nport = 8080\nmode = fast\n";
    const V2: &str = "port = 9090\nmode = slow\n";

    installed(language, &r.deploy("v1", config("1", V1)).await);
    assert_eq!(r.read("app.conf").as_deref(), Some(V1), "{lang}");
    assert!(
        r.read("app.conf.otabox-new").is_none(),
        "{lang}: cleaned up"
    );

    let again = r.deploy("v1-again", config("1", V1)).await;
    assert_eq!(
        again.result,
        StepResult::AlreadyInstalled {
            criteria: "/etc/example/app.conf@1".into()
        },
        "{lang}"
    );

    let report = r
        .deploy("bad", config("2", "port = 1\nthis is not a pair\n"))
        .await;
    let (phase, code, message, _) = failed(&report);
    assert_eq!((phase, code), ("validate", 10), "{lang}: {message}");
    assert!(message.contains("line 2"), "{lang}: {message}");
    assert_eq!(r.read("app.conf").as_deref(), Some(V1), "{lang}");

    // The declared reload command fails here (no systemd): rolled back.
    let mut v2 = config("2", V2);
    v2["reload"] = json!([
        "/usr/bin/systemctl",
        "reload",
        "otabox-example-absent.service"
    ]);
    let report = r.deploy("v2", v2).await;
    let (phase, code, message, rolled_back) = failed(&report);
    assert_eq!(phase, "apply", "{lang}: {message}");
    assert!([22, 23].contains(&code), "{lang}: {code} {message}");
    assert!(rolled_back, "{lang}: {message}");
    assert_eq!(r.read("app.conf").as_deref(), Some(V1), "{lang}: restored");

    let mut fresh = json!({"path": "/etc/example/new.conf", "version": "1", "content": V2});
    fresh["reload"] = json!([
        "/usr/bin/systemctl",
        "reload",
        "otabox-example-absent.service"
    ]);
    let report = r.deploy("new", fresh).await;
    let (_, _, message, rolled_back) = failed(&report);
    assert!(rolled_back, "{lang}: {message}");
    assert!(
        r.read("new.conf").is_none(),
        "{lang}: a new file goes again"
    );
}

/// An undeclared reload command is refused by the host and never runs; a
/// path outside the declared directory is out of reach: the step fails
/// and nothing outside changes.
async fn hostile(language: Language) {
    let Some(r) = rig(language).await else { return };
    let lang = language.name();
    const V1: &str = "port = 8080\n";
    installed(language, &r.deploy("v1", config("1", V1)).await);

    let pwned = r.root.join("pwned");
    let mut sneaky = config("2", "port = 1\n");
    sneaky["reload"] = json!(["/bin/sh", "-c", format!("touch {}", pwned.display())]);
    let report = r.deploy("sneaky", sneaky).await;
    let (phase, code, message, rolled_back) = failed(&report);
    assert_eq!((phase, code), ("apply", 22), "{lang}: {message}");
    assert!(message.contains("/bin/sh"), "{lang}: {message}");
    assert!(rolled_back, "{lang}");
    assert!(!pwned.exists(), "{lang}: the undeclared command ran");
    assert_eq!(r.read("app.conf").as_deref(), Some(V1), "{lang}");

    let victim = r.root.join("victim.conf");
    std::fs::write(&victim, "untouched = yes\n").expect("victim");
    let outside = std::env::temp_dir().join(format!("otabox-escape-{}.conf", std::process::id()));
    for (job, path) in [
        ("dotdot", "/etc/example/../victim.conf".to_string()),
        ("absolute", victim.display().to_string()),
        ("elsewhere", outside.display().to_string()),
    ] {
        let manifest = json!({"path": path, "version": "9", "content": "owned = yes\n"});
        let report = r.deploy(job, manifest).await;
        assert!(
            matches!(report.result, StepResult::Failed { .. }),
            "{lang}: {path} was reachable: {:?}",
            report.result
        );
    }
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "untouched = yes\n",
        "{lang}"
    );
    assert!(!outside.exists(), "{lang}: wrote {}", outside.display());
    assert!(!Path::new("/etc/example/../victim.conf").exists());
}

macro_rules! per_language {
    ($($test:ident => $body:ident($lang:expr);)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            $body($lang).await;
        }
    )*};
}

per_language! {
    python_lifecycle => lifecycle(Language::Python);
    python_sandbox => hostile(Language::Python);
    javascript_lifecycle => lifecycle(Language::JavaScript);
    javascript_sandbox => hostile(Language::JavaScript);
    quickjs_lifecycle => lifecycle(Language::JavaScriptQuickJs);
    quickjs_sandbox => hostile(Language::JavaScriptQuickJs);
    c_lifecycle => lifecycle(Language::C);
    c_sandbox => hostile(Language::C);
}

/// `otabox handlers audit` passes each build and lists the WASI its
/// language runtime imports, stubs marked.
#[test]
fn audit_shows_every_language_with_its_runtime_imports() {
    for language in Language::ALL {
        let Some(built) = language.build() else {
            continue;
        };
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_otabox"))
            .args(["handlers", "audit", "--dir"])
            .arg(&built)
            .output()
            .expect("otabox");
        let text = String::from_utf8_lossy(&out.stdout);
        let lang = language.name();
        assert!(out.status.success(), "{lang}:\n{text}");
        assert!(text.contains("handler config-file: ok"), "{lang}:\n{text}");
        assert!(text.contains("contract  1.1.0"), "{lang}:\n{text}");
        assert!(
            text.contains("otabox:handler/process@1.1.0                 process"),
            "{lang}:\n{text}"
        );
        assert!(
            text.contains("wasi:filesystem/preopens@0.2"),
            "{lang}:\n{text}"
        );
        let stubbed_sockets = text.contains("network (stub: refused)");
        let imports_sockets = text.contains("wasi:sockets/");
        assert_eq!(stubbed_sockets, imports_sockets, "{lang}:\n{text}");
    }
}

/// The ```python blocks of the Python section of `docs/authoring.md`.
fn python_guide_snippets() -> Vec<String> {
    let guide =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/authoring.md"))
            .expect("docs/authoring.md");
    let section = guide
        .split("### Python (componentize-py)")
        .nth(1)
        .and_then(|rest| rest.split("\n### ").next())
        .expect("the guide has a Python section");
    section
        .split("```python\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .map(str::to_string)
        .collect()
}

/// The Python guide's snippets run under CPython against the bindings
/// componentize-py generates for the example's world: every module, class,
/// variant case and enum spelling they name exists, and an `Err` from a
/// refused host call carries the host's message in `e.value.value`.
#[test]
fn the_python_guide_spells_the_generated_bindings_right() {
    if Language::Python.build().is_none() {
        return;
    }
    let snippets = python_guide_snippets();
    assert_eq!(snippets.len(), 2, "{snippets:?}");
    let dir = tempfile::tempdir().expect("tempdir");
    let bindings = dir.path().join("bindings");
    let generated = std::process::Command::new("componentize-py")
        .arg("--wit-path")
        .arg(languages::examples().join("wit"))
        .args(["--world", "example:config-file/handler@1.0.0", "bindings"])
        .arg(&bindings)
        .output()
        .expect("componentize-py");
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    // The second snippet is the body of a phase: run it as one, with the
    // host refusing the command.
    let body: String = snippets[1].lines().map(|l| format!("    {l}\n")).collect();
    let script = format!(
        "{}\n\
         def status(code, message):\n    return types.Status(code, types.ExtendedCode(7, 0, 0), message, [])\n\
         def refuse(command):\n    raise Err(types.HostError_Denied('/bin/reload is not allowed'))\n\
         process.run = refuse\n\
         def phase(program, args):\n{body}\
         out = phase('/bin/reload', [])\n\
         assert isinstance(out, types.Outcome_Failed), out\n\
         assert out.value.message == 'the host refused /bin/reload: /bin/reload is not allowed', out\n\
         print('ok')\n",
        snippets[0]
    );
    let ran = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .env("PYTHONPATH", &bindings)
        .output()
        .expect("python3");
    assert!(
        ran.status.success() && ran.stdout == b"ok\n",
        "{script}\n{}{}",
        String::from_utf8_lossy(&ran.stdout),
        String::from_utf8_lossy(&ran.stderr)
    );
}
