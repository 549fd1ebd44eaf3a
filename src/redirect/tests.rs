//! The generated rules of both backends: marks, loopback, excluded ports, the HBONE exception,
//! removal of only what l4mesh created, and the command line.

use super::*;
use clap::Parser;

fn rules(mark: u32, inbound: &[u16], outbound: &[u16]) -> Rules {
    Rules {
        packet_mark: mark,
        exclude_inbound_ports: inbound.to_vec(),
        exclude_outbound_ports: outbound.to_vec(),
        dns_capture: false,
    }
}

#[test]
fn dns_capture_redirects_port_53_of_both_protocols_after_the_exemptions() {
    let r = Rules {
        dns_capture: true,
        ..rules(1337, &[], &[])
    };
    let ipt = lines(&install_plan(Backend::Iptables, &r));
    let pos = |needle: &str| {
        ipt.iter()
            .position(|l| l == needle)
            .unwrap_or_else(|| panic!("{needle} in {ipt:#?}"))
    };
    let lo = pos("iptables -t nat -A L4MESH_OUTPUT -o lo -j RETURN");
    let udp =
        pos("iptables -t nat -A L4MESH_OUTPUT -p udp --dport 53 -j REDIRECT --to-ports 15053");
    let tcp =
        pos("iptables -t nat -A L4MESH_OUTPUT -p tcp --dport 53 -j REDIRECT --to-ports 15053");
    let all_tcp = pos("iptables -t nat -A L4MESH_OUTPUT -p tcp -j REDIRECT --to-ports 15001");
    assert!(lo < udp && udp < tcp && tcp < all_tcp);
    pos("iptables -t nat -A OUTPUT -p udp --dport 53 -j L4MESH_OUTPUT");
    let nft = nft_script(&r);
    let at = |n: &str| nft.find(n).unwrap_or_else(|| panic!("{n} in {nft}"));
    assert!(at("oifname \"lo\" return") < at("udp dport 53 redirect to :15053"));
    assert!(at("tcp dport 53 redirect to :15053") < at("meta l4proto tcp redirect to :15001"));
    // Off by default: no port 53 rule at all.
    assert!(
        !lines(&install_plan(Backend::Iptables, &rules(1337, &[], &[])))
            .join("\n")
            .contains("53 ")
    );
    assert!(!nft_script(&rules(1337, &[], &[])).contains("dport 53"));
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
        "iptables -t nat -A L4MESH_OUTPUT -m mark --mark 0x539/0xfff -j RETURN",
        "iptables -t nat -A L4MESH_OUTPUT -m mark --mark 0x111/0xfff -j RETURN",
        "iptables -t nat -A L4MESH_OUTPUT -o lo -j RETURN",
        "iptables -t nat -A L4MESH_OUTPUT -p tcp --dport 3306 -j RETURN",
        "iptables -t nat -A L4MESH_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        "iptables -t nat -N L4MESH_PREROUTING",
        "iptables -t nat -A L4MESH_PREROUTING -m mark --mark 0x539/0xfff -j RETURN",
        "iptables -t nat -A L4MESH_PREROUTING -i lo -j RETURN",
        "iptables -t nat -A L4MESH_PREROUTING -p tcp --dport 15008 -j RETURN",
        "iptables -t nat -A L4MESH_PREROUTING -p tcp --dport 15021 -j RETURN",
        "iptables -t nat -A L4MESH_PREROUTING -p tcp --dport 22 -j RETURN",
        "iptables -t nat -A L4MESH_PREROUTING -p tcp -j REDIRECT --to-ports 15006",
        "iptables -t nat -A OUTPUT -p tcp -j L4MESH_OUTPUT",
        "iptables -t nat -A PREROUTING -p tcp -j L4MESH_PREROUTING",
        "iptables -t mangle -N L4MESH_MANGLE_PREROUTING",
        "iptables -t mangle -A L4MESH_MANGLE_PREROUTING -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
        "iptables -t mangle -N L4MESH_MANGLE_OUTPUT",
        "iptables -t mangle -A L4MESH_MANGLE_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
        "iptables -t mangle -A PREROUTING -j L4MESH_MANGLE_PREROUTING",
        "iptables -t mangle -A OUTPUT -j L4MESH_MANGLE_OUTPUT",
    ];
    assert_eq!(got, want);
}

#[test]
fn iptables_custom_mark_no_excludes() {
    let got = lines(&install_plan(Backend::Iptables, &rules(7, &[], &[]))).join("\n");
    assert_eq!(got.matches("--mark 0x7/0xfff -j RETURN").count(), 2);
    assert!(
        got.contains("--mark 0x7/0xfff -j CONNMARK --set-xmark 0x111/0xfff"),
        "{got}"
    );
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
    assert!(out.contains("meta mark & 0xfff == 0x539 return"), "{s}");
    assert!(out.contains("meta mark & 0xfff == 0x111 return"), "{s}");
    assert!(
        s.contains("type route hook output priority mangle;")
            && s.contains("ct mark & 0xfff == 0x111 meta mark set ct mark"),
        "{s}"
    );
    assert!(
        s.contains("meta mark & 0xfff == 0x539 ct mark set ct mark & 0xfffff000 | 0x111"),
        "{s}"
    );
    assert!(out.contains("oifname \"lo\" return"), "{s}");
    assert!(out.contains("tcp dport 3306 return"), "{s}");
    assert!(out.contains("meta l4proto tcp redirect to :15001"), "{s}");
    assert!(
        pre.contains("type nat hook prerouting priority -100;"),
        "{s}"
    );
    assert!(pre.contains("meta mark & 0xfff == 0x539 return"), "{s}");
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
    assert_eq!(s.matches("meta mark & 0xfff == 0x2a return").count(), 2);
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
    // Both tables, as `remove` lists them.
    let both = format!(
        "*nat\n{listing}*mangle\n-P PREROUTING ACCEPT\n-N L4MESH_MANGLE_PREROUTING\n-N L4MESH_MANGLE_OUTPUT\n\
-A PREROUTING -j L4MESH_MANGLE_PREROUTING\n-A OUTPUT -j L4MESH_MANGLE_OUTPUT\n-A OUTPUT -j MARK --set-mark 5\n"
    );
    let got = lines(&remove_plan(Backend::Iptables, &both));
    assert_eq!(got.len(), 12, "{got:#?}");
    assert_eq!(
        got[6..],
        [
            "iptables -t mangle -D PREROUTING -j L4MESH_MANGLE_PREROUTING",
            "iptables -t mangle -D OUTPUT -j L4MESH_MANGLE_OUTPUT",
            "iptables -t mangle -F L4MESH_MANGLE_OUTPUT",
            "iptables -t mangle -X L4MESH_MANGLE_OUTPUT",
            "iptables -t mangle -F L4MESH_MANGLE_PREROUTING",
            "iptables -t mangle -X L4MESH_MANGLE_PREROUTING",
        ]
    );
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

#[test]
fn policy_routing_install_and_remove_only_ours() {
    assert_eq!(
        lines(&routing_install_plan(Family::V4)),
        [
            "ip -4 rule add fwmark 0x111/0xfff pref 32764 lookup 100 protocol 176",
            "ip -4 route add local 0.0.0.0/0 dev lo table 100 proto 176",
        ]
    );
    let plan = routing_install_plan(Family::V6);
    assert_eq!(
        lines(&plan),
        [
            "ip -6 rule add fwmark 0x111/0xfff pref 32764 lookup 100 protocol 176",
            "ip -6 route add local ::/0 dev lo table 100 proto 176",
        ]
    );
    // An identical route already there (istio-cni's) is someone else's, not a failure.
    assert!(plan.iter().all(|c| c.exists_is_foreign));
    // istio-cni's identical but untagged rule and route stay; l4mesh's (proto 176) go, each copy.
    let rules = "0:\tfrom all lookup local\n32764:\tfrom all fwmark 0x111/0xfff lookup 100\n\
32764:\tfrom all fwmark 0x111/0xfff lookup 100 proto 176\n32764:\tfrom all fwmark 0x111/0xfff lookup 100 proto 176\n\
32765:\tfrom all fwmark 0x222 lookup 100 proto 176\n32766:\tfrom all lookup main\n";
    let routes = "local default dev lo proto 176 scope host \n10.0.0.0/8 dev eth0 \n";
    assert_eq!(
        lines(&routing_remove_plan(Family::V4, rules, routes)),
        [
            "ip -4 rule del fwmark 0x111/0xfff pref 32764 lookup 100 protocol 176",
            "ip -4 rule del fwmark 0x111/0xfff pref 32764 lookup 100 protocol 176",
            "ip -4 route del local 0.0.0.0/0 dev lo table 100 proto 176",
        ]
    );
    let foreign = "local default dev lo scope host \n";
    assert!(routing_remove_plan(Family::V6, "0:\tfrom all lookup local\n", foreign).is_empty());
}

#[test]
fn ip6tables_writes_and_removes_the_same_chains() {
    let v4 = lines(&iptables_install("iptables", &rules(1337, &[], &[])));
    let v6 = lines(&iptables_install("ip6tables", &rules(1337, &[], &[])));
    assert_eq!(v4.len(), v6.len());
    for (a, b) in v4.iter().zip(&v6) {
        assert_eq!(a.replacen("iptables", "ip6tables", 1), *b);
    }
    let listing = "*nat\n-N L4MESH_OUTPUT\n-A OUTPUT -p tcp -j L4MESH_OUTPUT\n";
    assert_eq!(
        lines(&iptables_remove_plan("ip6tables", listing)),
        [
            "ip6tables -t nat -D OUTPUT -p tcp -j L4MESH_OUTPUT",
            "ip6tables -t nat -F L4MESH_OUTPUT",
            "ip6tables -t nat -X L4MESH_OUTPUT",
        ]
    );
    assert_eq!(
        iptables_list_cmds("ip6tables")[0].1.to_string(),
        "ip6tables -t nat -S"
    );
}

#[test]
fn marks_match_under_istio_cnis_mask() {
    assert_eq!(mark_mask(1337), 0xfff);
    // A mark with bits above the mask is matched whole, never truncated into another mark.
    assert_eq!(mark_mask(0x10539), u32::MAX);
    let got = lines(&install_plan(Backend::Iptables, &rules(0x10539, &[], &[]))).join("\n");
    assert!(got.contains("--mark 0x10539/0xffffffff -j RETURN"), "{got}");
}
