//! `relive image build` through the real binary, on images made here: OCI
//! layouts (a gzip, a zstd and a plain layer, with whiteouts, an opaque
//! directory, hard and symbolic links, a device node, a fifo, setuid and
//! owners), the same image as an OCI archive and as a `docker save`
//! tarball, and a root directory. Each archive is unpacked with Debian's
//! `cpio` (as root: owners and devices kept) and compared with the tree
//! the layers describe; the same input gives the same bytes; every bad
//! input is refused with a message naming it and no output file.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers fail a test by panicking

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::temp_dir;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn relive_bin() -> PathBuf {
    relive_testkit::bins::beside_exe("relive").unwrap()
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// One entry of a test layer.
enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, u32, &'a [u8]),
    Owned(&'a str, u32, u32, u32, &'a [u8]),
    Symlink(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Char(&'a str, u32, u32),
    Fifo(&'a str),
}

/// A tar stream of `entries`.
fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        let (path, data): (&str, &[u8]) = match e {
            E::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                (p, &[])
            }
            E::File(p, mode, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                (p, data)
            }
            E::Owned(p, mode, uid, gid, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(u64::from(*uid));
                h.set_gid(u64::from(*gid));
                (p, data)
            }
            E::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_link_name(target).unwrap();
                (p, &[])
            }
            E::Hard(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o755);
                h.set_link_name(target).unwrap();
                (p, &[])
            }
            E::Char(p, major, minor) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_device_major(*major).unwrap();
                h.set_device_minor(*minor).unwrap();
                (p, &[])
            }
            E::Fifo(p) => {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_mode(0o600);
                (p, &[])
            }
        };
        h.set_size(data.len() as u64);
        // Raw names: the tests need `..` and the like to reach the builder.
        let name = path.as_bytes();
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// The three layers of the test image and what they leave.
fn layers() -> Vec<(&'static str, Vec<u8>)> {
    let one = layer(&[
        E::Dir("bin", 0o755),
        E::File("bin/app", 0o755, b"#!/bin/sh\necho app\n"),
        E::Symlink("bin/rel", "app"),
        E::Symlink("bin/abs", "/bin/app"),
        E::Hard("bin/hard", "bin/app"),
        E::Dir("etc", 0o755),
        E::File("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n"),
        E::Dir("opt", 0o755),
        E::File("opt/gone", 0o644, b"removed by layer 2"),
        E::File("var/lib/old/x", 0o600, b"hidden by the opaque dir"),
        E::Owned("usr/bin/su", 0o4755, 0, 0, b"setuid"),
        E::Owned("home/app/data", 0o640, 1000, 1000, b"owned"),
        E::Char("dev/null", 1, 3),
        E::Fifo("run/fifo"),
    ]);
    let two = layer(&[
        E::File("opt/.wh.gone", 0o644, b""),
        E::File("var/lib/old/.wh..wh..opq", 0o644, b""),
        E::File("var/lib/old/new", 0o644, b"new in layer 2"),
        E::File(
            "etc/passwd",
            0o644,
            b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        ),
    ]);
    let three = layer(&[E::File("bin/.wh.app", 0o644, b"")]);
    vec![
        ("application/vnd.oci.image.layer.v1.tar+gzip", gzip(&one)),
        (
            "application/vnd.oci.image.layer.v1.tar+zstd",
            zstd::encode_all(&two[..], 3).unwrap(),
        ),
        ("application/vnd.oci.image.layer.v1.tar", three),
    ]
}

/// Uncompressed layers (for diff_ids).
fn plain_layers() -> Vec<Vec<u8>> {
    layers()
        .into_iter()
        .map(|(media, bytes)| {
            if media.ends_with("gzip") {
                let mut out = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut out)
                    .unwrap();
                out
            } else if media.ends_with("zstd") {
                zstd::decode_all(&bytes[..]).unwrap()
            } else {
                bytes
            }
        })
        .collect()
}

fn config(arch: &str, diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/hard"],
            "Cmd": ["--flag"],
            "Env": ["PATH=/bin:/usr/bin", "A=1"],
            "WorkingDir": "/home/app",
            "User": "1000:1000"
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .unwrap()
}

/// Writes a blob into `dir/blobs/sha256/`; returns its descriptor.
fn blob(dir: &Path, media: &str, bytes: &[u8]) -> Value {
    let digest = sha(bytes);
    let path = dir.join("blobs/sha256").join(&digest[7..]);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    json!({"mediaType": media, "digest": digest, "size": bytes.len()})
}

/// An OCI layout of the test image at `dir`: an index with an arm64 and an
/// amd64 manifest (the arm64 one's blobs are left out: never read).
fn oci_layout(dir: &Path, with_amd64: bool) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let diff_ids: Vec<String> = plain_layers().iter().map(|l| sha(l)).collect();
    let layer_descs: Vec<Value> = layers()
        .iter()
        .map(|(media, bytes)| blob(dir, media, bytes))
        .collect();
    let config_desc = blob(
        dir,
        "application/vnd.oci.image.config.v1+json",
        &config("amd64", &diff_ids),
    );
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": layer_descs,
    }))
    .unwrap();
    let mut amd64 = blob(dir, "application/vnd.oci.image.manifest.v1+json", &manifest);
    amd64["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let arm64 = json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": format!("sha256:{}", "0".repeat(64)),
        "size": 1,
        "platform": {"architecture": "arm64", "os": "linux"}
    });
    let manifests = if with_amd64 {
        vec![arm64, amd64]
    } else {
        vec![arm64]
    };
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": manifests})).unwrap(),
    )
    .unwrap();
}

struct Built {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn build(source: &Path, output: &Path, agent: &Path, extra: &[&str]) -> Built {
    let out = Command::new(relive_bin())
        .args(["image", "build"])
        .arg(source)
        .arg("-o")
        .arg(output)
        .arg("--agent")
        .arg(agent)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Built {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A path of an unpacked tree, as a comparable description.
fn describe(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let ft = meta.file_type();
            let what = if ft.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("-> {}", std::fs::read_link(&path).unwrap().display())
            } else if ft.is_file() {
                format!(
                    "file {:?} links {}",
                    String::from_utf8_lossy(&std::fs::read(&path).unwrap()),
                    meta.nlink()
                )
            } else if ft.is_char_device() {
                format!(
                    "char {}:{}",
                    libc::major(meta.rdev()),
                    libc::minor(meta.rdev())
                )
            } else if ft.is_fifo() {
                "fifo".to_string()
            } else {
                "other".to_string()
            };
            let mode = if ft.is_symlink() {
                0
            } else {
                meta.mode() & 0o7777
            };
            out.insert(
                rel,
                format!("{what} mode {mode:o} {}:{}", meta.uid(), meta.gid()),
            );
        }
    }
    out
}

/// Unpacks `archive` (a plain cpio) with Debian's cpio.
fn unpack(archive: &Path, into: &Path) -> BTreeMap<String, String> {
    std::fs::create_dir_all(into).unwrap();
    let status = Command::new("cpio")
        .args(["-idm", "--quiet", "--no-absolute-filenames"])
        .current_dir(into)
        .stdin(std::fs::File::open(archive).unwrap())
        .status()
        .expect("Debian's cpio (scripts/setup.sh installs it)");
    assert!(status.success(), "cpio -i failed on {}", archive.display());
    describe(into)
}

fn expected(agent: &[u8], config: &str) -> BTreeMap<String, String> {
    let e = |s: &str, d: String| (s.to_string(), d);
    BTreeMap::from([
        e("bin", "dir mode 755 0:0".into()),
        e("bin/abs", "-> /bin/app mode 0 0:0".into()),
        e("bin/hard", "file \"#!/bin/sh\\necho app\\n\" links 1 mode 755 0:0".into()),
        e("bin/rel", "-> app mode 0 0:0".into()),
        e("dev", "dir mode 755 0:0".into()),
        e("dev/null", "char 1:3 mode 666 0:0".into()),
        e("etc", "dir mode 755 0:0".into()),
        e(
            "etc/passwd",
            "file \"root:x:0:0::/root:/bin/sh\\napp:x:1000:1000::/home/app:/bin/sh\\n\" links 1 mode 644 0:0".into(),
        ),
        e("home", "dir mode 755 0:0".into()),
        e("home/app", "dir mode 755 0:0".into()),
        e("home/app/data", "file \"owned\" links 1 mode 640 1000:1000".into()),
        e(
            "init",
            format!("file {:?} links 1 mode 755 0:0", String::from_utf8_lossy(agent)),
        ),
        e("opt", "dir mode 755 0:0".into()),
        e(".relive", "dir mode 755 0:0".into()),
        e(".relive/config.json", format!("file {config:?} links 1 mode 644 0:0")),
        e("run", "dir mode 755 0:0".into()),
        e("run/fifo", "fifo mode 600 0:0".into()),
        e("usr", "dir mode 755 0:0".into()),
        e("usr/bin", "dir mode 755 0:0".into()),
        e("usr/bin/su", "file \"setuid\" links 1 mode 4755 0:0".into()),
        e("var", "dir mode 755 0:0".into()),
        e("var/lib", "dir mode 755 0:0".into()),
        e("var/lib/old", "dir mode 755 0:0".into()),
        e("var/lib/old/new", "file \"new in layer 2\" links 1 mode 644 0:0".into()),
    ])
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn an_oci_layout_becomes_the_tree_its_layers_describe_in_the_same_bytes_every_time() {
    if !is_root() {
        eprintln!("skipping: unpacking owners and device nodes needs root");
        assert!(!common::env_flag("RELIVE_REQUIRE_KVM"), "CI runs as root");
        return;
    }
    let dir = temp_dir();
    let layout = dir.join("layout");
    oci_layout(&layout, true);
    let agent = dir.join("agent");
    std::fs::write(&agent, b"\x7fELF not really").unwrap();
    let out = dir.join("app.cpio");
    let built = build(
        &layout,
        &out,
        &agent,
        &["--compress", "none", "--env", "A=2"],
    );
    assert_eq!(built.code, Some(0), "{}", built.stderr);
    assert!(
        built.stdout.contains("OCI layout (3 layers)"),
        "{}",
        built.stdout
    );
    let run_config = serde_json::to_string_pretty(&relive_oci::RunConfig {
        entrypoint: vec!["/bin/hard".into()],
        cmd: vec!["--flag".into()],
        env: vec!["PATH=/bin:/usr/bin".into(), "A=2".into()],
        working_dir: "/home/app".into(),
        user: "1000:1000".into(),
    })
    .unwrap();
    let tree = unpack(&out, &dir.join("unpacked"));
    let want = expected(b"\x7fELF not really", &run_config);
    assert_eq!(tree, want);

    // Reproducible, and the compressed forms hold the same archive.
    let plain = std::fs::read(&out).unwrap();
    let again = dir.join("again.cpio");
    assert_eq!(
        build(
            &layout,
            &again,
            &agent,
            &["--compress", "none", "--env", "A=2"]
        )
        .code,
        Some(0)
    );
    assert_eq!(
        std::fs::read(&again).unwrap(),
        plain,
        "the same input gave other bytes"
    );
    for (codec, decode) in [
        (
            "gzip",
            (|b: &[u8]| {
                let mut out = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(b), &mut out).unwrap();
                out
            }) as fn(&[u8]) -> Vec<u8>,
        ),
        ("zstd", |b: &[u8]| zstd::decode_all(b).unwrap()),
    ] {
        let a = dir.join(format!("a.{codec}"));
        let b = dir.join(format!("b.{codec}"));
        for path in [&a, &b] {
            let built = build(
                &layout,
                path,
                &agent,
                &["--compress", codec, "--env", "A=2"],
            );
            assert_eq!(built.code, Some(0), "{}", built.stderr);
        }
        let bytes = std::fs::read(&a).unwrap();
        assert_eq!(
            bytes,
            std::fs::read(&b).unwrap(),
            "{codec}: not reproducible"
        );
        assert_eq!(decode(&bytes), plain, "{codec}: another archive inside");
    }

    // The same image as an OCI archive (tarball of the layout) and as a
    // `docker save` tarball: the same tree.
    let archive = dir.join("image-oci.tar");
    let status = Command::new("tar")
        .arg("-cf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let from_archive = dir.join("from-archive.cpio");
    let built = build(
        &archive,
        &from_archive,
        &agent,
        &["--compress", "none", "--env", "A=2"],
    );
    assert_eq!(built.code, Some(0), "{}", built.stderr);
    assert_eq!(std::fs::read(&from_archive).unwrap(), plain);

    let docker = dir.join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    let plains = plain_layers();
    let diff_ids: Vec<String> = plains.iter().map(|l| sha(l)).collect();
    let mut names = Vec::new();
    for (i, l) in plains.iter().enumerate() {
        let name = format!("layer{i}/layer.tar");
        std::fs::create_dir_all(docker.join(format!("layer{i}"))).unwrap();
        std::fs::write(docker.join(&name), l).unwrap();
        names.push(name);
    }
    std::fs::write(docker.join("cfg.json"), config("amd64", &diff_ids)).unwrap();
    std::fs::write(
        docker.join("manifest.json"),
        serde_json::to_vec(&json!([{"Config": "cfg.json", "RepoTags": ["t:1"], "Layers": names}]))
            .unwrap(),
    )
    .unwrap();
    let docker_tar = dir.join("image-docker.tar");
    assert!(Command::new("tar")
        .arg("-cf")
        .arg(&docker_tar)
        .arg("-C")
        .arg(&docker)
        .arg(".")
        .status()
        .unwrap()
        .success());
    let from_docker = dir.join("from-docker.cpio");
    let built = build(
        &docker_tar,
        &from_docker,
        &agent,
        &["--compress", "none", "--env", "A=2"],
    );
    assert_eq!(built.code, Some(0), "{}", built.stderr);
    assert!(
        built.stdout.contains("docker save archive"),
        "{}",
        built.stdout
    );
    assert_eq!(std::fs::read(&from_docker).unwrap(), plain);
    // No scratch directory is left beside the output.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_root_directory_with_an_entrypoint_keeps_its_links() {
    let dir = temp_dir();
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(root.join("bin/tool"), b"tool").unwrap();
    std::fs::hard_link(root.join("bin/tool"), root.join("bin/alias")).unwrap();
    std::os::unix::fs::symlink("tool", root.join("bin/sh")).unwrap();
    let agent = dir.join("agent");
    std::fs::write(&agent, b"agent").unwrap();
    let out = dir.join("root.cpio");
    let refused = build(&root, &out, &agent, &["--compress", "none"]);
    assert_eq!(refused.code, Some(1));
    assert!(
        refused.stderr.contains("--entrypoint"),
        "{}",
        refused.stderr
    );
    assert!(!out.exists());
    let built = build(
        &root,
        &out,
        &agent,
        &[
            "--compress",
            "none",
            "--entrypoint",
            r#"["/bin/sh","-c","tool"]"#,
        ],
    );
    assert_eq!(built.code, Some(0), "{}", built.stderr);
    let tree = unpack(&out, &dir.join("unpacked"));
    let uid = std::fs::metadata(root.join("bin/tool")).unwrap().uid();
    assert!(
        tree["bin/alias"].starts_with("file \"tool\" links 2"),
        "{tree:?}"
    );
    assert!(
        tree["bin/tool"].starts_with("file \"tool\" links 2"),
        "{tree:?}"
    );
    assert!(tree["bin/sh"].starts_with("-> tool"), "{tree:?}");
    if is_root() {
        assert!(tree["bin/tool"].ends_with(&format!("{uid}:{uid}")) || uid == 0);
    }
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("unpacked/.relive/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["entrypoint"], json!(["/bin/sh", "-c", "tool"]));
}

/// Every bad input: exit 1, one message naming the problem, no output.
#[test]
fn bad_images_are_refused_naming_the_problem_and_nothing_is_written() {
    let dir = temp_dir();
    let agent = dir.join("agent");
    std::fs::write(&agent, b"agent").unwrap();
    let mut cases: Vec<(&str, PathBuf, &str)> = Vec::new();

    let missing = dir.join("no-such-image");
    cases.push(("missing input", missing, "skopeo copy"));

    let arm = dir.join("arm");
    oci_layout(&arm, false);
    cases.push(("arm64 only", arm, "no image for linux/amd64"));

    let no_blob = dir.join("no-blob");
    oci_layout(&no_blob, true);
    let (_, first) = &layers()[0];
    std::fs::remove_file(no_blob.join("blobs/sha256").join(&sha(first)[7..])).unwrap();
    cases.push(("missing layer blob", no_blob, "is missing"));

    let flipped = dir.join("flipped");
    oci_layout(&flipped, true);
    let (_, third) = &layers()[2];
    let path = flipped.join("blobs/sha256").join(&sha(third)[7..]);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();
    cases.push(("digest mismatch", flipped, "does not match its descriptor"));

    // Layouts whose only layer is malicious.
    for (name, entries, words) in [
        (
            "dotdot",
            layer(&[E::File("../../etc/evil", 0o644, b"x")]),
            "climbs out of the root",
        ),
        (
            "through-symlink",
            layer(&[E::Symlink("etc", "/"), E::File("etc/passwd", 0o644, b"x")]),
            "goes through the symbolic link",
        ),
    ] {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let l = blob(&d, "application/vnd.oci.image.layer.v1.tar", &entries);
        let c = blob(
            &d,
            "application/vnd.oci.image.config.v1+json",
            &config("amd64", &[sha(&entries)]),
        );
        let m =
            serde_json::to_vec(&json!({"schemaVersion": 2, "config": c, "layers": [l]})).unwrap();
        let md = blob(&d, "application/vnd.oci.image.manifest.v1+json", &m);
        std::fs::write(
            d.join("index.json"),
            serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [md]})).unwrap(),
        )
        .unwrap();
        cases.push((name, d, words));
    }

    // A dynamically linked agent: no loader in an initramfs to run it.
    let dynamic_agent = relive_testkit::bins::beside_exe("relive-agent").unwrap();
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(root.join("bin/app"), b"app").unwrap();
    let out = dir.join("dynamic-agent.cpio");
    let built = build(&root, &out, &dynamic_agent, &["--entrypoint", "/bin/app"]);
    assert_eq!(built.code, Some(1), "{}", built.stderr);
    assert!(
        built.stderr.contains("dynamically linked") && built.stderr.contains("build-agent.sh"),
        "{}",
        built.stderr
    );
    assert!(!out.exists());

    for (what, source, words) in cases {
        let out = dir.join(format!("{what}.cpio"));
        let built = build(&source, &out, &agent, &[]);
        assert_eq!(
            built.code,
            Some(1),
            "{what}: {}{}",
            built.stdout,
            built.stderr
        );
        assert!(built.stderr.contains(words), "{what}: {}", built.stderr);
        assert!(
            built.stderr.starts_with("relive: error: "),
            "{what}: {}",
            built.stderr
        );
        assert!(!out.exists(), "{what}: an output was left");
        let stray: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.contains(".tmp-") || n.starts_with(".relive-image"))
            .collect();
        assert!(stray.is_empty(), "{what}: left {stray:?}");
    }
}
