//! The policy routing of `l4mesh redirect`, the same for both backends: packets carrying
//! [`ROUTE_MARK`] (the replies to connections l4mesh opened from a client's address) are delivered
//! locally, through `ip rule fwmark … lookup` [`ROUTE_TABLE`] and a `local` default route in that
//! table — istio-cni's in-pod rule and route — for IPv4 and IPv6.
//!
//! istio-cni installs the *same* rule and route. So l4mesh tags its own with the routing protocol
//! [`ROUTE_PROTO`] (`ip rule … protocol 176`, `ip route … proto 176`) and removes only entries
//! carrying it; an identical route that already exists (istio-cni's) makes `add` fail with "File
//! exists", which counts as present and not ours: it is neither an error nor rolled back.

use super::Cmd;

/// The connection / packet mark (under [`ROUTE_MASK`]) of connections l4mesh opened from a
/// client's address, and the routing table that delivers their replies locally (istio-cni's
/// in-pod values: `InpodTProxyMark`/`InpodTProxyMask`, `RouteTableInbound`, priority 32764).
pub const ROUTE_MARK: u32 = 0x111;
pub const ROUTE_MASK: u32 = 0xfff;
pub const ROUTE_TABLE: u32 = 100;
/// Priority of the `ip rule` (istio-cni's, just before the main table's 32766).
pub const ROUTE_RULE_PREF: u32 = 32764;
/// The routing protocol number that marks l4mesh's `ip rule` and route as its own. Unassigned in
/// iproute2's `rt_protos` (0–4 kernel, 8–18 and 42, 99, 186–192 routing daemons) and not used by
/// istio-cni, whose entries carry the default.
pub const ROUTE_PROTO: u8 = 176;

/// An IP family of the policy routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn default_route(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

/// The commands that list the policy routing [`routing_remove_plan`] looks at: rules, then the
/// routes of [`ROUTE_TABLE`].
pub fn routing_list_cmds(family: Family) -> [Cmd; 2] {
    [
        Cmd::new("ip", &[family.flag(), "rule", "show"]),
        Cmd::new(
            "ip",
            &[
                family.flag(),
                "route",
                "show",
                "table",
                &ROUTE_TABLE.to_string(),
            ],
        ),
    ]
}

fn rule(family: Family, verb: &str) -> Cmd {
    let (fwmark, table) = (
        format!("{ROUTE_MARK:#x}/{ROUTE_MASK:#x}"),
        ROUTE_TABLE.to_string(),
    );
    let (pref, proto) = (ROUTE_RULE_PREF.to_string(), ROUTE_PROTO.to_string());
    Cmd::new(
        "ip",
        &[
            family.flag(),
            "rule",
            verb,
            "fwmark",
            &fwmark,
            "pref",
            &pref,
            "lookup",
            &table,
            "protocol",
            &proto,
        ],
    )
}

fn route(family: Family, verb: &str) -> Cmd {
    let (table, proto) = (ROUTE_TABLE.to_string(), ROUTE_PROTO.to_string());
    Cmd::new(
        "ip",
        &[
            family.flag(),
            "route",
            verb,
            "local",
            family.default_route(),
            "dev",
            "lo",
            "table",
            &table,
            "proto",
            &proto,
        ],
    )
}

/// The policy routing that delivers the replies of orig-source connections to l4mesh (same for
/// both backends). Each `add` tolerates an identical entry that is already there: `install` has just
/// removed l4mesh's own, so it is someone else's (the kernel refuses a second identical route; a
/// rule differing only in its protocol is a distinct rule and is added).
pub fn routing_install_plan(family: Family) -> Vec<Cmd> {
    let mut cmds = vec![rule(family, "add"), route(family, "add")];
    for c in &mut cmds {
        c.exists_is_foreign = true;
    }
    cmds
}

/// Removes what [`routing_install_plan`] added, given the outputs of [`routing_list_cmds`]: each
/// `ip rule` line and local route tagged with [`ROUTE_PROTO`] (one delete per copy); nothing
/// else, so istio-cni's identical but untagged entries stay.
pub fn routing_remove_plan(family: Family, rules: &str, routes: &str) -> Vec<Cmd> {
    let fwmark = format!("{ROUTE_MARK:#x}/{ROUTE_MASK:#x}");
    let (table, pref, proto) = (
        ROUTE_TABLE.to_string(),
        format!("{ROUTE_RULE_PREF}:"),
        ROUTE_PROTO.to_string(),
    );
    let tagged = |words: &[&str]| words.windows(2).any(|w| w == ["proto", proto.as_str()]);
    let mut cmds = Vec::new();
    for line in rules.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let ours = words.first() == Some(&pref.as_str())
            && words.windows(2).any(|w| w == ["fwmark", fwmark.as_str()])
            && words.windows(2).any(|w| w == ["lookup", table.as_str()])
            && tagged(&words);
        if ours {
            cmds.push(rule(family, "del"));
        }
    }
    for line in routes.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words
            .iter()
            .take(4)
            .eq(["local", "default", "dev", "lo"].iter())
            && tagged(&words)
        {
            cmds.push(route(family, "del"));
        }
    }
    cmds
}
