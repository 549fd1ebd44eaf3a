//! The policy routing of `l4mesh redirect`, the same for both backends: packets carrying
//! [`ROUTE_MARK`] (the replies to connections l4mesh opened from a client's address) are delivered
//! locally, through `ip rule fwmark … lookup` [`ROUTE_TABLE`] and a `local` default route in that
//! table — istio-cni's in-pod rule and route. IPv4 only.

use super::Cmd;

/// The connection / packet mark (under [`ROUTE_MASK`]) of connections l4mesh opened from a
/// client's address, and the routing table that delivers their replies locally (istio-cni's
/// in-pod values: `InpodTProxyMark`/`InpodTProxyMask`, `RouteTableInbound`, priority 32764).
pub const ROUTE_MARK: u32 = 0x111;
pub const ROUTE_MASK: u32 = 0xfff;
pub const ROUTE_TABLE: u32 = 100;
/// Priority of the `ip rule` (istio-cni's, just before the main table's 32766).
pub const ROUTE_RULE_PREF: u32 = 32764;

/// The commands that list the policy routing [`routing_remove_plan`] looks at: rules, then the
/// routes of [`ROUTE_TABLE`].
pub fn routing_list_cmds() -> [Cmd; 2] {
    [
        Cmd::new("ip", &["-4", "rule", "show"]),
        Cmd::new(
            "ip",
            &["-4", "route", "show", "table", &ROUTE_TABLE.to_string()],
        ),
    ]
}

/// The policy routing that delivers the replies of orig-source connections to l4mesh (same for
/// both backends).
pub fn routing_install_plan() -> Vec<Cmd> {
    let (fwmark, table) = (
        format!("{ROUTE_MARK:#x}/{ROUTE_MASK:#x}"),
        ROUTE_TABLE.to_string(),
    );
    let pref = ROUTE_RULE_PREF.to_string();
    vec![
        Cmd::new(
            "ip",
            &[
                "-4", "rule", "add", "fwmark", &fwmark, "pref", &pref, "lookup", &table,
            ],
        ),
        Cmd::new(
            "ip",
            &[
                "-4",
                "route",
                "add",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                &table,
            ],
        ),
    ]
}

/// Removes what [`routing_install_plan`] added, given the outputs of [`routing_list_cmds`]: each
/// of l4mesh's `ip rule` lines (one delete per copy) and its local route; nothing else.
pub fn routing_remove_plan(rules: &str, routes: &str) -> Vec<Cmd> {
    let (fwmark, table) = (
        format!("{ROUTE_MARK:#x}/{ROUTE_MASK:#x}"),
        ROUTE_TABLE.to_string(),
    );
    let pref = ROUTE_RULE_PREF.to_string();
    let mut cmds = Vec::new();
    for line in rules.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let ours = words.first() == Some(&format!("{pref}:").as_str())
            && words.windows(2).any(|w| w == ["fwmark", fwmark.as_str()])
            && words.windows(2).any(|w| w == ["lookup", table.as_str()]);
        if ours {
            cmds.push(Cmd::new(
                "ip",
                &[
                    "-4", "rule", "del", "fwmark", &fwmark, "pref", &pref, "lookup", &table,
                ],
            ));
        }
    }
    for line in routes.lines() {
        if line
            .split_whitespace()
            .take(4)
            .eq(["local", "default", "dev", "lo"])
        {
            cmds.push(Cmd::new(
                "ip",
                &[
                    "-4",
                    "route",
                    "del",
                    "local",
                    "0.0.0.0/0",
                    "dev",
                    "lo",
                    "table",
                    &table,
                ],
            ));
        }
    }
    cmds
}
