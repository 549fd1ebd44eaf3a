//! The generated rules of both backends: marks, loopback, excluded ports, the HBONE exception,
//! removal of only what l4mesh created, and the command line.

use super::*;
use clap::Parser;

fn rules(mark: u32, inbound: &[u16], outbound: &[u16]) -> Rules {
    Rules {
        packet_mark: mark,
        exclude_inbound_ports: inbound.to_vec(),
        exclude_outbound_ports: outbound.to_vec(),
    }
}

fn lines(cmds: &[Cmd]) -> Vec<String> {
    cmds.iter().map(Cmd::to_string).collect()
}

#[test]
fn iptables_rules_in_order() {
    let got = lines(&install_plan(
        Backend::Iptables,
        &rules(1337, &[15021, 22], &[3306]),
    ));
    let want = [
        "iptables -t nat -N L4MESH_OUTPUT",
        "iptables -t nat -A L4MESH_OUTPUT -m mark --mark 1337 -j RETURN",
        "iptables -t nat -A L4MESH_OUTPUT -o lo -j RETURN",
        "iptables -t nat -A L4MESH_OUTPUT -p tcp --dport 3306 -j RETURN",
        "iptables -t nat -A L4MESH_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        "iptables -t nat -N L4MESH_PREROUTING",
        "iptables -t nat -A L4MESH_PREROUTING -m mark --mark 1337 -j RETURN",
        "iptables -t nat -A L4MESH_PREROUTING -i lo -j RETURN",
        "iptables -t nat -A L4MESH_PREROUTING -p tcp --dport 15008 -j RETURN",
        "iptables -t nat -A L4MESH_PREROUTING -p tcp --dport 15021 -j RETURN",
        "iptables -t nat -A L4MESH_PREROUTING -p tcp --dport 22 -j RETURN",
        "iptables -t nat -A L4MESH_PREROUTING -p tcp -j REDIRECT --to-ports 15006",
        "iptables -t nat -A OUTPUT -p tcp -j L4MESH_OUTPUT",
        "iptables -t nat -A PREROUTING -p tcp -j L4MESH_PREROUTING",
    ];
    assert_eq!(got, want);
}

#[test]
fn iptables_custom_mark_no_excludes() {
    let got = lines(&install_plan(Backend::Iptables, &rules(7, &[], &[]))).join("\n");
    assert_eq!(got.matches("--mark 7 -j RETURN").count(), 2);
    assert!(!got.contains("1337"));
    assert_eq!(
        got.matches("--dport").count(),
        1,
        "only the HBONE exception: {got}"
    );
}

#[test]
fn nft_script_rules() {
    let plan = install_plan(Backend::Nftables, &rules(1337, &[15021, 22], &[3306]));
    assert_eq!(plan.len(), 1);
    assert_eq!(plan[0].args, ["-f", "-"]);
    let s = plan[0].stdin.clone().unwrap();
    assert!(
        s.starts_with("add table inet l4mesh\ndelete table inet l4mesh\n"),
        "{s}"
    );
    let (out, pre) = s.split_once("chain prerouting").unwrap();
    assert!(out.contains("type nat hook output priority -100;"), "{s}");
    assert!(out.contains("meta mark 1337 return"), "{s}");
    assert!(out.contains("oifname \"lo\" return"), "{s}");
    assert!(out.contains("tcp dport 3306 return"), "{s}");
    assert!(out.contains("meta l4proto tcp redirect to :15001"), "{s}");
    assert!(
        pre.contains("type nat hook prerouting priority -100;"),
        "{s}"
    );
    assert!(pre.contains("meta mark 1337 return"), "{s}");
    assert!(pre.contains("iifname \"lo\" return"), "{s}");
    assert!(pre.contains("tcp dport 15008 return"), "{s}");
    assert!(pre.contains("tcp dport { 15021, 22 } return"), "{s}");
    assert!(pre.contains("meta l4proto tcp redirect to :15006"), "{s}");
    // Every exception comes before the redirect.
    assert!(pre.find("15008").unwrap() < pre.find("redirect").unwrap());
    assert!(out.find("3306").unwrap() < out.find("redirect").unwrap());
}

#[test]
fn nft_script_without_excludes() {
    let s = nft_script(&rules(42, &[], &[]));
    assert_eq!(s.matches("meta mark 42 return").count(), 2);
    assert_eq!(s.matches("tcp dport").count(), 1, "{s}");
}

#[test]
fn iptables_remove_only_ours() {
    let listing = "-P PREROUTING ACCEPT\n-P OUTPUT ACCEPT\n-N L4MESH_OUTPUT\n-N L4MESH_PREROUTING\n-N OTHER\n\
-A PREROUTING -p tcp -j L4MESH_PREROUTING\n-A OUTPUT -p tcp -j L4MESH_OUTPUT\n-A OUTPUT -p tcp -j OTHER\n\
-A L4MESH_OUTPUT -p tcp -j REDIRECT --to-ports 15001\n";
    let got = lines(&remove_plan(Backend::Iptables, listing));
    assert_eq!(
        got,
        [
            "iptables -t nat -D PREROUTING -p tcp -j L4MESH_PREROUTING",
            "iptables -t nat -D OUTPUT -p tcp -j L4MESH_OUTPUT",
            "iptables -t nat -F L4MESH_OUTPUT",
            "iptables -t nat -X L4MESH_OUTPUT",
            "iptables -t nat -F L4MESH_PREROUTING",
            "iptables -t nat -X L4MESH_PREROUTING",
        ]
    );
    let nothing = "-P PREROUTING ACCEPT\n-P OUTPUT ACCEPT\n-A OUTPUT -p tcp -j OTHER\n";
    assert!(remove_plan(Backend::Iptables, nothing).is_empty());
}

#[test]
fn nft_remove_only_ours() {
    let got = lines(&remove_plan(
        Backend::Nftables,
        "table ip nat\ntable inet l4mesh\ntable inet l4mesh2\n",
    ));
    assert_eq!(got, ["nft delete table inet l4mesh"]);
    assert!(remove_plan(Backend::Nftables, "table ip nat\ntable inet l4mesh2\n").is_empty());
}

#[test]
fn command_line() {
    let a = crate::config::Args::try_parse_from([
        "l4mesh",
        "redirect",
        "install",
        "--backend",
        "iptables",
        "--packet-mark",
        "9",
        "--exclude-inbound-ports",
        "22,15021,22",
        "--exclude-outbound-ports",
        "3306",
    ])
    .unwrap();
    let Some(crate::config::Command::Redirect {
        action: RedirectCommand::Install(r),
    }) = a.command
    else {
        panic!("{a:?}");
    };
    assert_eq!(r.backend, Some(Backend::Iptables));
    assert_eq!(
        Rules::from(&r),
        rules(9, &[22, 15021], &[3306]),
        "sorted, deduplicated"
    );
    // By default the readiness and metrics ports stay off the proxy path.
    let a = crate::config::Args::try_parse_from(["l4mesh", "redirect", "install"]).unwrap();
    let Some(crate::config::Command::Redirect {
        action: RedirectCommand::Install(r),
    }) = a.command
    else {
        panic!("{a:?}");
    };
    assert_eq!(r.exclude_inbound_ports, vec![15020, 15021]);
    let a = crate::config::Args::try_parse_from(["l4mesh", "redirect", "remove"]).unwrap();
    assert!(matches!(
        a.command,
        Some(crate::config::Command::Redirect {
            action: RedirectCommand::Remove(_)
        })
    ));
    // Mark 0 would match every unmarked packet: refused.
    assert!(crate::config::Args::try_parse_from([
        "l4mesh",
        "redirect",
        "install",
        "--packet-mark",
        "0"
    ])
    .is_err());
    // Without a subcommand l4mesh runs the proxy, as before.
    let a = crate::config::Args::try_parse_from(["l4mesh", "--packet-mark", "5"]).unwrap();
    assert!(a.command.is_none());
    assert_eq!(a.packet_mark, 5);
}

#[test]
fn errors_name_command_status_and_hint() {
    let cmd = Cmd::new("definitely-not-a-binary-l4mesh", &["x"]);
    let e = exec(&cmd).unwrap_err().to_string();
    assert!(e.contains("definitely-not-a-binary-l4mesh x"), "{e}");
    assert!(e.contains("installed"), "{e}");
    let e = exec(&Cmd::new(
        "sh",
        &[
            "-c",
            "echo 'Permission denied (you must be root)' >&2; exit 4",
        ],
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("exit status: 4"), "{e}");
    assert!(e.contains("Permission denied"), "{e}");
    assert!(e.contains("not root?"), "{e}");
}
