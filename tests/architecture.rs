//! ARCHITECTURE.md keeps its code map in step with the workspace.

use std::path::Path;

#[test]
fn every_workspace_member_is_in_the_code_map() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let map = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let members_line = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("Cargo.toml has a members list");
    let members: Vec<&str> = members_line.split('"').skip(1).step_by(2).collect();
    assert!(!members.is_empty());
    for member in members {
        assert!(
            map.contains(&format!("| `{member}` |")),
            "workspace member {member} is missing from ARCHITECTURE.md"
        );
    }
}

#[test]
fn every_vmm_module_is_in_the_code_map() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let map = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    for entry in std::fs::read_dir(root.join("vmm/src")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name == "lib.rs" {
            continue;
        }
        let shown = if name.ends_with(".rs") {
            name.clone()
        } else {
            format!("{name}/")
        };
        assert!(
            map.contains(&format!("`{shown}`")),
            "vmm/src/{name} is missing from ARCHITECTURE.md"
        );
    }
}

#[test]
fn the_supervisor_and_the_wire_contract_link_no_kvm() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for member in ["supervisor", "control"] {
        let manifest = std::fs::read_to_string(root.join(member).join("Cargo.toml")).unwrap();
        for forbidden in [
            "relive-vmm",
            "kvm-ioctls",
            "kvm-bindings",
            "vm-memory",
            "linux-loader",
            "vm-superio",
        ] {
            assert!(
                !manifest
                    .lines()
                    .any(|l| l.trim_start().starts_with(forbidden)),
                "{member}/Cargo.toml depends on {forbidden}: the wire types live in relive-control"
            );
        }
    }
}
