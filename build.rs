//! Records the git revision for `onsip_exporter_build_info{revision}`.
//! Outside a git checkout (e.g. an image build from a tarball) it is
//! "unknown" unless ONSIP_BUILD_REVISION is set.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=ONSIP_BUILD_REVISION");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    if std::env::var_os("ONSIP_BUILD_REVISION").is_some() {
        return;
    }
    let revision = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    if let Some(revision) = revision {
        println!("cargo:rustc-env=ONSIP_BUILD_REVISION={revision}");
    }
}
