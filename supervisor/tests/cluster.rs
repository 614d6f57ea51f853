//! Cluster membership, ownership and fencing against a real etcd (Debian's
//! `etcd-server`, started by each test on loopback ports in a directory of
//! its own):
//!
//! - a VM has one owner at a time; a write with a token that is no longer
//!   the VM's is refused;
//! - a host cut from etcd (its connection stalls through a proxy the test
//!   holds, with no error, as when a network drops packets) fences itself
//!   before the other hosts can see its lease expire, then joins again with
//!   a new lease, owning nothing, its old token refused.
//!
//! Without `etcd` the tests skip with the reason (fail under
//! `RELIVE_REQUIRE_TOOLS=1`, which CI sets; `scripts/setup.sh` installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use relive_supervisor::cluster::{Claim, ClusterConfig, ClusterError, Member, Standing};
use relive_testkit::etcd::{Etcd, Proxy};
use relive_testkit::TempDir;
use tokio_util::sync::CancellationToken;

/// Short timings, as a test can afford: TTL 3 s, renewals every 500 ms,
/// requests bounded at 500 ms, fencing 1 s before the TTL could run out.
fn config(host: &str, endpoint: SocketAddr) -> ClusterConfig {
    ClusterConfig {
        etcd: vec![format!("http://{endpoint}")],
        host: host.to_string(),
        advertise: None,
        prefix: "/relive-test".into(),
        lease_ttl: Duration::from_secs(3),
        keepalive_interval: Duration::from_millis(500),
        request_timeout: Duration::from_millis(500),
        fence_margin: Duration::from_secs(1),
        failover_grace: Duration::from_millis(500),
        token: None,
        replicas: 0,
    }
}

async fn join(host: &str, endpoint: SocketAddr, dir: &Path) -> Arc<Member> {
    Member::join(
        config(host, endpoint),
        &dir.join(format!("{host}-lease.json")),
        CancellationToken::new(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_has_one_owner_and_a_stale_token_cannot_write() {
    let scratch = TempDir::create("relive-cluster-owner").unwrap();
    let Some(etcd) = Etcd::start(scratch.path()) else {
        return;
    };
    let a = join("host-a", etcd.client, scratch.path()).await;
    let b = join("host-b", etcd.client, scratch.path()).await;
    let hosts: Vec<String> = a
        .hosts()
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.host)
        .collect();
    assert_eq!(hosts, ["host-a", "host-b"]);

    let Claim::Owned {
        token: first,
        lease,
    } = a.acquire("web").await.unwrap()
    else {
        panic!("the first claim must own the VM");
    };
    assert_eq!(
        lease,
        a.standing().lease(),
        "the owner key is on host-a's lease"
    );
    // Asking again on the same lease is the same ownership.
    assert_eq!(
        a.acquire("web").await.unwrap(),
        Claim::Owned {
            token: first,
            lease
        }
    );
    match b.acquire("web").await.unwrap() {
        Claim::Taken { owner, token } => {
            assert_eq!(owner.host, "host-a");
            assert_eq!(token, first);
        }
        other => panic!("host-b must see host-a's ownership, got {other:?}"),
    }
    a.owner_put("web", first, "status", b"running".to_vec())
        .await
        .unwrap();
    // host-b writing with host-a's token while host-a still owns it is
    // allowed by etcd (tokens are not secrets), so the supervisors only ever
    // write with a token their own claim returned; what fencing promises
    // is the next part: once the VM changed hands, the old token is dead.
    a.release("web", first).await.unwrap();
    let Claim::Owned { token: second, .. } = b.acquire("web").await.unwrap() else {
        panic!("host-b must take the released VM");
    };
    assert!(second > first, "tokens only grow: {first} then {second}");
    match a.owner_put("web", first, "status", b"stale".to_vec()).await {
        Err(ClusterError::Stale { vm, token }) => {
            assert_eq!((vm.as_str(), token), ("web", first));
        }
        other => panic!("a write with the old token must be refused, got {other:?}"),
    }
    b.owner_put("web", second, "status", b"running".to_vec())
        .await
        .unwrap();
    assert_eq!(
        a.owner("web").await.unwrap().map(|(o, t)| (o.host, t)),
        Some(("host-b".to_string(), second))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cut_from_etcd_fences_itself_before_its_lease_expires_then_rejoins_owning_nothing() {
    let scratch = TempDir::create("relive-cluster-fence").unwrap();
    let Some(etcd) = Etcd::start(scratch.path()) else {
        return;
    };
    let proxy = Proxy::start(etcd.client).unwrap();
    let a = join("host-a", proxy.addr, scratch.path()).await;
    let b = join("host-b", etcd.client, scratch.path()).await;
    let Claim::Owned { token, .. } = a.acquire("web").await.unwrap() else {
        panic!("host-a must own the VM");
    };
    let old_lease = a.standing().lease();
    let watcher = b.clone();
    let seen_gone = tokio::spawn(async move {
        watcher.wait_unowned("web").await.unwrap();
        Instant::now()
    });
    // Let a few renewals go through, then cut host-a off.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(a.standing().is_live());
    let mut standing = a.subscribe();
    let cut_at = Instant::now();
    proxy.cut(true);
    let fenced_at = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if matches!(*standing.borrow_and_update(), Standing::Fenced { .. }) {
                return Instant::now();
            }
            standing.changed().await.unwrap();
        }
    })
    .await
    .expect("host-a must fence itself within 10 s of the cut");
    let gone_at = tokio::time::timeout(Duration::from_secs(10), seen_gone)
        .await
        .expect("host-b must see host-a's ownership end within 10 s")
        .unwrap();
    let ttl = Duration::from_secs(3);
    eprintln!(
        "cut -> host-a fenced {:?}; cut -> host-b saw the owner key gone {:?} (TTL {ttl:?})",
        fenced_at - cut_at,
        gone_at - cut_at
    );
    assert!(
        fenced_at < gone_at,
        "host-a must be fenced ({:?} after the cut) before host-b can see its lease expire ({:?})",
        fenced_at - cut_at,
        gone_at - cut_at
    );
    assert!(
        fenced_at - cut_at <= ttl,
        "host-a must fence itself within the TTL of its last renewal: {:?}",
        fenced_at - cut_at
    );
    // Fenced: no owner action from host-a.
    assert!(matches!(a.acquire("web").await, Err(ClusterError::Fenced)));
    let Claim::Owned { token: taken, .. } = b.acquire("web").await.unwrap() else {
        panic!("host-b must take the VM once host-a's ownership ended");
    };
    assert!(taken > token);

    // The network comes back: host-a joins again on a new lease and owns
    // nothing; its old token is refused.
    proxy.cut(false);
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let now = *standing.borrow_and_update();
            if matches!(now, Standing::Live { lease, .. } if lease != old_lease) {
                return;
            }
            standing.changed().await.unwrap();
        }
    })
    .await
    .expect("host-a must join again within 15 s of the network's return");
    match a.acquire("web").await.unwrap() {
        Claim::Taken { owner, .. } => assert_eq!(owner.host, "host-b"),
        other => panic!("host-a must not own the VM again, got {other:?}"),
    }
    assert!(matches!(
        a.owner_put("web", token, "status", b"stale".to_vec()).await,
        Err(ClusterError::Stale { .. })
    ));
}

/// The peer listener, through real sockets with the owner's own client
/// (`replication::push`): a wrong token, an unknown VM, a name that is not
/// an image file, an image that does not verify (not kept), and a fencing
/// token older than one already seen are each refused, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_listener_refuses_what_it_must_not_store() {
    use relive_supervisor::replication::{peer_router, push, PeerState};
    let scratch = TempDir::create("relive-cluster-peer").unwrap();
    let images = scratch.join("web-images");
    let state = PeerState::new(
        [("web".to_string(), images.clone(), 3)],
        "peer-token-0123456789".to_string(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, peer_router(state)).await });
    let junk = scratch.join("1796212234521-01a236979919785bb72cf252ffa3d49d.rimg");
    std::fs::write(&junk, b"not an image").unwrap();
    let t = Duration::from_secs(10);
    let files = [junk.clone()];

    let wrong = push(addr, "wrong-token-0123456789", "web", 10, &files, t).await;
    assert!(
        wrong.as_ref().is_err_and(|e| e.contains("401")),
        "{wrong:?}"
    );
    let unknown = push(addr, "peer-token-0123456789", "db", 10, &files, t).await;
    assert!(
        unknown.as_ref().is_err_and(|e| e.contains("no VM named")),
        "{unknown:?}"
    );
    let badly_named = scratch.join("web.img");
    std::fs::write(&badly_named, b"x").unwrap();
    let named = push(addr, "peer-token-0123456789", "web", 10, &[badly_named], t).await;
    assert!(
        named.as_ref().is_err_and(|e| e.contains("400")),
        "{named:?}"
    );
    let corrupt = push(addr, "peer-token-0123456789", "web", 10, &files, t).await;
    assert!(
        corrupt
            .as_ref()
            .is_err_and(|e| e.contains("verification failed")),
        "{corrupt:?}"
    );
    let kept: Vec<_> = std::fs::read_dir(&images)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert!(
        kept.is_empty(),
        "a peer keeps no image it could not verify: {kept:?}"
    );
    let stale = push(addr, "peer-token-0123456789", "web", 9, &files, t).await;
    assert!(
        stale
            .as_ref()
            .is_err_and(|e| e.contains("409") && e.contains("older than 10")),
        "{stale:?}"
    );
}

/// An image with every section and `mem` as its memory, committed in `dir`.
fn write_image(
    dir: &Path,
    kind: relive_images::format::ImageKind,
    mem: &[u8],
) -> relive_images::format::CommittedImage {
    use relive_images::format::{ImageWriter, MemoryRegionSource, PageRun, SectionKind};
    let mut w = ImageWriter::create(dir, kind).unwrap();
    for k in SectionKind::ALL
        .into_iter()
        .filter(|k| !matches!(k, SectionKind::Memory | SectionKind::MemoryMap))
    {
        w.add_section(k, 1, format!("{{\"section\":\"{k}\"}}").as_bytes())
            .unwrap();
    }
    w.add_memory(&[MemoryRegionSource {
        guest_addr: 0,
        bytes: mem,
        present: PageRun::nonzero(mem),
    }])
    .unwrap();
    w.commit().unwrap()
}

/// A host that takes a VM over without its latest image pulls the files
/// the manifest names (the boot image, the full image and its layer) from
/// a live holder's peer listener, verified as pushed files are; a second
/// pull fetches nothing; a file the holder does not have, or one that does
/// not verify, fails the pull, naming the holder and the file, and nothing
/// unverified is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_pulls_the_image_it_lacks_from_a_holder() {
    use relive_images::format::ImageKind;
    use relive_images::ImageStore;
    use relive_supervisor::replication::{peer_router, pull, Manifest, PeerState};
    let scratch = TempDir::create("relive-cluster-pull").unwrap();
    let Some(etcd) = Etcd::start(scratch.path()) else {
        return;
    };
    let bearer = "pull-token-0123456789";
    // host-a holds the images and serves them.
    let held = scratch.join("a-images");
    std::fs::create_dir_all(&held).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = PeerState::new([("web".to_string(), held.clone(), 3)], bearer.to_string());
    tokio::spawn(async move { axum::serve(listener, peer_router(state)).await });
    let mut a_config = config("host-a", etcd.client);
    a_config.advertise = Some(addr);
    let a = Member::join(
        a_config,
        &scratch.join("host-a-lease.json"),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let b = join("host-b", etcd.client, scratch.path()).await;
    let Claim::Owned { token, .. } = a.acquire("web").await.unwrap() else {
        panic!("host-a must own web");
    };
    let page = 4096;
    let mut mem = vec![0u8; 64 * page];
    mem[..page].fill(1);
    let boot = {
        use relive_images::format::{ImageWriter, SectionKind};
        let mut w = ImageWriter::create(&held, ImageKind::Boot).unwrap();
        w.add_section(SectionKind::Config, 1, b"{\"boot\":true}")
            .unwrap();
        w.commit().unwrap()
    };
    let full = write_image(&held, ImageKind::Full, &mem);
    mem[5 * page..6 * page].fill(7);
    let layer = write_image(&held, ImageKind::Incremental { parent: full.id }, &mem);
    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    let manifest = Manifest {
        file: name(&layer.path),
        chain: [&boot.path, &full.path, &layer.path]
            .iter()
            .map(|p| name(p))
            .collect(),
        hosts: vec!["host-a".to_string()],
        token,
        cpu: String::new(),
    };

    let store_b = ImageStore::open(&scratch.join("b-images"), 3).unwrap();
    let pulled = pull(&b, bearer, "web", &manifest, &store_b).await.unwrap();
    assert_eq!(
        (pulled.from.as_str(), pulled.files),
        ("host-a", 3),
        "{pulled:?}"
    );
    for file in &manifest.chain {
        assert_eq!(
            std::fs::read(store_b.dir().join(file)).unwrap(),
            std::fs::read(held.join(file)).unwrap(),
            "{file} pulled byte for byte"
        );
    }
    let lengths: u64 = manifest
        .chain
        .iter()
        .map(|f| std::fs::metadata(held.join(f)).unwrap().len())
        .sum();
    assert!(
        pulled.bytes < lengths,
        "only data extents travel: {} of {lengths} bytes",
        pulled.bytes
    );
    let chosen = store_b.latest_verified().unwrap().image.expect("an image");
    assert_eq!(name(chosen.path()), manifest.file);
    let again = pull(&b, bearer, "web", &manifest, &store_b).await.unwrap();
    assert_eq!(again.files, 0, "nothing is pulled twice: {again:?}");

    // A file the holder lacks.
    let store_c = ImageStore::open(&scratch.join("c-images"), 3).unwrap();
    std::fs::remove_file(&layer.path).unwrap();
    let missing = pull(&b, bearer, "web", &manifest, &store_c).await;
    assert!(
        missing
            .as_ref()
            .is_err_and(|e| e.contains("host host-a") && e.contains(&manifest.file)),
        "{missing:?}"
    );
    // A file that does not verify.
    std::fs::copy(store_b.dir().join(&manifest.file), &layer.path).unwrap();
    // A byte of the page the layer carries (page 5, all 7s).
    let bytes = std::fs::read(&layer.path).unwrap();
    let at = bytes
        .windows(page)
        .position(|w| w.iter().all(|&b| b == 7))
        .expect("the layer's page") as u64
        + 100;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&layer.path)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xa5], at).unwrap();
    let corrupt = pull(&b, bearer, "web", &manifest, &store_c).await;
    assert!(
        corrupt
            .as_ref()
            .is_err_and(|e| e.contains("verification failed")),
        "{corrupt:?}"
    );
    assert!(
        !store_c.dir().join(&manifest.file).exists(),
        "an image that did not verify is not kept"
    );
    drop(etcd);
}
