//! Cluster mode with the real binary: what `conclave serve --store/--bus/--node` refuses before
//! it opens anything, each refusal saying what to do instead.
//! (Nodes on a shared PostgreSQL and nats-server: `cluster_nodes.rs`.)

mod common;

use std::path::Path;

use common::{conclave, run};

fn serve(data: &Path, args: &[&str], envs: &[(&str, &str)]) -> common::Finished {
    let mut cmd = conclave(["serve", "--data-dir"]);
    cmd.arg(data).args(["--listen", "127.0.0.1:0"]).args(args);
    cmd.env_remove("CONCLAVE_PG_PASSWORD");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    run("serve", cmd)
}

#[test]
fn cluster_flags_refuse_passwords_and_plaintext_and_say_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let f = serve(
        &data,
        &["--store", "postgres://conclave:s3cret@127.0.0.1:5432/chat"],
        &[],
    );
    f.assert_failure()
        .assert_stderr_has("CONCLAVE_PG_PASSWORD")
        .assert_stderr_has("store_password_file");
    assert!(
        !f.stderr.contains("s3cret"),
        "the password is not repeated: {f:#?}"
    );
    assert!(!data.exists(), "nothing is created before the checks pass");

    serve(
        &data,
        &["--store", "postgres://conclave@db.example.org:5432/chat"],
        &[],
    )
    .assert_failure()
    .assert_stderr_has("no plaintext transport");
    serve(
        &data,
        &[
            "--store",
            "postgres://conclave@127.0.0.1:5432/chat",
            "--bus",
            "nats://192.0.2.10:4222",
        ],
        &[],
    )
    .assert_failure()
    .assert_stderr_has("no plaintext transport");
    // --bus without --store: clap says what is missing.
    serve(&data, &["--bus", "nats://127.0.0.1:4222"], &[])
        .assert_failure()
        .assert_stderr_has("--store");

    // The password file must be private.
    std::fs::create_dir_all(&data).expect("mkdir");
    let pw = dir.path().join("pg-password");
    std::fs::write(&pw, "s3cret\n").expect("write");
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    let config = dir.path().join("conclave.toml");
    std::fs::write(
        &config,
        format!(
            "store = \"postgres://conclave@127.0.0.1:5432/chat\"\nstore_password_file = \"{}\"\nnode = \"n1\"\n",
            pw.display()
        ),
    )
    .expect("write");
    let config = config.to_string_lossy().to_string();
    serve(&data, &["--config", &config], &[])
        .assert_failure()
        .assert_stderr_has("chmod 600");
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    // Every check passes; nothing listens on port 5432 here, and the error says what to check.
    serve(&data, &["--config", &config], &[])
        .assert_failure()
        .assert_stderr_has("cannot open the cluster's store")
        .assert_stderr_has("PostgreSQL");
}
