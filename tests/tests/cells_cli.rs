//! `flotilla cells` as an operator uses it, against a real `flotilla dev` with two cells.

use flotilla_tests::dev::Dev;
use flotilla_tests::flotilla;
use serde_json::Value;

fn cells(dev: &Dev, args: &[&str]) -> (i32, String, String) {
    let out = flotilla()
        .arg("cells")
        .args(args)
        .args(["--server", &dev.url])
        .env("FLOTILLA_TOKEN", &dev.token)
        .output()
        .expect("run flotilla cells");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_lists_cordons_drains_and_uncordons_cells_from_the_cli() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(&tmp.path().join("data"), &["--cells", "2"]).await;

    // Both cells connect; the table shows them.
    let mut listed = String::new();
    for _ in 0..100 {
        let (code, out, err) = cells(&dev, &["list"]);
        assert_eq!(code, 0, "{err}");
        listed = out;
        if listed.matches("active").count() == 2 && !listed.contains("disconnected") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let header = listed.lines().next().expect("a header");
    for column in [
        "CELL",
        "STATE",
        "RUNNERS",
        "JOBS",
        "WORKLOAD",
        "HOME",
        "HEARTBEAT",
    ] {
        assert!(header.contains(column), "{listed}");
    }
    assert!(
        listed.contains("local-1") && listed.contains("local-2"),
        "{listed}"
    );

    let (code, out, err) = cells(&dev, &["cordon", "local-1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("local-1: cordoned"), "{out}");
    let (_, json, _) = cells(&dev, &["list", "--json"]);
    let v: Value = serde_json::from_str(&json).expect("--json prints JSON");
    let state = |v: &Value, id: &str| {
        v.as_array()
            .expect("a list")
            .iter()
            .find(|c| c["id"] == id)
            .map(|c| c["state"].as_str().expect("state").to_owned())
    };
    assert_eq!(state(&v, "local-1").as_deref(), Some("cordoned"));

    // An empty cell drains at once; the command waits and says so.
    let (code, out, err) = cells(&dev, &["drain", "local-2", "--deadline", "1m"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("local-2: draining until"), "{out}");
    assert!(out.contains("local-2: drained"), "{out}");

    let (code, out, err) = cells(&dev, &["uncordon", "local-2"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("local-2: active"), "{out}");

    // Mistakes say what is wrong and exit non-zero.
    let (code, _, err) = cells(&dev, &["drain", "local-2", "--deadline", "soon"]);
    assert_eq!(code, 1);
    assert!(err.contains("is not a duration"), "{err}");
    let (code, _, err) = cells(&dev, &["cordon", "nowhere"]);
    assert_eq!(code, 1);
    assert!(err.contains("not found") && err.contains("404"), "{err}");
    let out = flotilla()
        .args(["cells", "list", "--server", &dev.url])
        .env("FLOTILLA_TOKEN", "flt_wrong")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));

    dev.stop().await;
}
