//! The indexes of one immutable version of the mesh state, and the pure lookups over them.

use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::Arc;

use imbl::{HashMap, HashSet};

use super::{Removal, Upsert};
use crate::model::{
    best_match, Authorization, Endpoint, NetworkAddr, PolicyKey, PolicyScope, Service, ServiceKey,
    Workload, WorkloadUid,
};

/// One version of the mesh state. Cloning is O(1): every index is a persistent map.
#[derive(Clone, Default)]
pub struct Snapshot {
    pub(super) version: u64,
    workloads: HashMap<WorkloadUid, Arc<Workload>>,
    /// The address indexes list every holder, oldest first; the last one answers lookups. Addresses
    /// and hostnames can be shared (a reused pod IP, host-network pods, one external host declared in
    /// two namespaces), so removing one holder falls back to another (see [`index_add`]).
    workload_by_addr: HashMap<NetworkAddr, Vec<WorkloadUid>>,
    /// Node name → its workloads: what a node proxy serves inbound and holds certificates for.
    workloads_by_node: HashMap<Arc<str>, HashSet<WorkloadUid>>,
    services: HashMap<ServiceKey, Arc<Service>>,
    service_by_vip: HashMap<NetworkAddr, Vec<ServiceKey>>,
    service_by_host: HashMap<Arc<str>, Vec<ServiceKey>>,
    /// The services with address ranges (CIDR VIPs), scanned when no exact VIP matches.
    cidr_services: HashMap<ServiceKey, Arc<Service>>,
    /// Per service key, whether or not the service is known yet: a workload may arrive first.
    endpoints: HashMap<ServiceKey, HashMap<WorkloadUid, Arc<Endpoint>>>,
    policies: HashMap<PolicyKey, Arc<Authorization>>,
    /// The policies themselves (not keys), so that evaluating a connection walks them without a
    /// lookup per policy.
    policies_by_ns: HashMap<Arc<str>, HashMap<PolicyKey, Arc<Authorization>>>,
    global_policies: HashMap<PolicyKey, Arc<Authorization>>,
}

impl Snapshot {
    /// Increases by one with every applied batch.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn workload(&self, uid: &WorkloadUid) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    pub fn workload_by_addr(&self, addr: &NetworkAddr) -> Option<&Arc<Workload>> {
        self.workload_by_addr
            .get(addr)
            .and_then(|uids| uids.last())
            .and_then(|uid| self.workloads.get(uid))
    }

    pub fn service(&self, key: &ServiceKey) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    /// The service a client of `client_namespace` reaches at the exact VIP `addr`: among the
    /// services holding it, the [`best_match`] (as ztunnel: its own namespace's, else the
    /// canonical one, else the first registered).
    pub fn service_by_vip(
        &self,
        addr: &NetworkAddr,
        client_namespace: Option<&str>,
    ) -> Option<&Arc<Service>> {
        best_match(self.services_at_vip(addr), client_namespace, None)
    }

    /// Every service holding the exact VIP `addr`, the first registered first.
    pub fn services_at_vip<'a>(
        &'a self,
        addr: &NetworkAddr,
    ) -> impl Iterator<Item = &'a Arc<Service>> + 'a {
        self.service_by_vip
            .get(addr)
            .into_iter()
            .flatten()
            .filter_map(|k| self.services.get(k))
    }

    /// The service whose address range holds `addr` (a ServiceEntry's CIDR), the longest prefix
    /// first; ties go to [`best_match`] in key order (the same on every node). Asked only for
    /// destinations that are neither a VIP nor a workload, so ranges never take a pod's traffic.
    pub fn service_by_range(
        &self,
        addr: &NetworkAddr,
        client_namespace: Option<&str>,
    ) -> Option<&Arc<Service>> {
        if self.cidr_services.is_empty() {
            return None;
        }
        let longest = self
            .cidr_services
            .values()
            .flat_map(|s| s.cidr_vips.iter())
            .filter(|c| c.contains(addr))
            .map(|c| c.net.prefix_len())
            .max()?;
        let mut tied: Vec<&Arc<Service>> = self
            .cidr_services
            .values()
            .filter(|s| {
                s.cidr_vips
                    .iter()
                    .any(|c| c.net.prefix_len() == longest && c.contains(addr))
            })
            .collect();
        tied.sort_by_key(|s| s.key());
        best_match(tied.into_iter(), client_namespace, None)
    }

    /// The first registered service with this hostname (tests and tools; the data path and the
    /// DNS proxy choose among all of them with [`best_match`]).
    pub fn service_by_hostname(&self, hostname: &str) -> Option<&Arc<Service>> {
        self.services_by_hostname(hostname).next()
    }

    /// Every service with this hostname, the oldest first: one hostname may be declared in several
    /// namespaces (a Kubernetes service and ServiceEntries), and the DNS proxy chooses among them.
    pub fn services_by_hostname<'a>(
        &'a self,
        hostname: &str,
    ) -> impl Iterator<Item = &'a Arc<Service>> + 'a {
        self.service_by_host
            .get(hostname)
            .into_iter()
            .flatten()
            .filter_map(|k| self.services.get(k))
    }

    /// The endpoints of a service with their workloads (endpoints whose workload is gone are skipped).
    pub fn endpoints<'a>(
        &'a self,
        key: &ServiceKey,
    ) -> impl Iterator<Item = (&'a Arc<Workload>, &'a Arc<Endpoint>)> + 'a {
        self.endpoints
            .get(key)
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(|ep| self.workloads.get(&ep.workload).map(|w| (w, ep)))
    }

    pub fn policy(&self, key: &PolicyKey) -> Option<&Arc<Authorization>> {
        self.policies.get(key)
    }

    /// The policies that apply to a destination workload: global ones, those of its namespace, and
    /// the workload-selector ones it lists.
    pub fn policies_for<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a Arc<Authorization>> + 'a {
        let ns = self
            .policies_by_ns
            .get(workload.namespace.as_str())
            .into_iter()
            .flat_map(|s| s.values());
        let selected = workload.authorization_policies.iter().filter_map(|k| {
            let p = self.policies.get(&PolicyKey(k.as_str().into()))?;
            (p.scope == PolicyScope::WorkloadSelector).then_some(p)
        });
        self.global_policies.values().chain(ns).chain(selected)
    }

    /// The workloads whose `node` is `node` (cost proportional to their number, not the mesh's).
    pub fn workloads_on_node<'a>(
        &'a self,
        node: &str,
    ) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        self.workloads_by_node
            .get(node)
            .into_iter()
            .flat_map(|s| s.iter())
            .filter_map(|uid| self.workloads.get(uid))
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn policies(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.policies.values()
    }

    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.workloads.len(),
            self.services.len(),
            self.policies.len(),
        )
    }

    pub(super) fn upsert(&mut self, u: Upsert) {
        match u {
            Upsert::Workload(w) => self.upsert_workload(w),
            Upsert::Service(s) => self.upsert_service(s),
            Upsert::Policy(p) => self.upsert_policy(p),
        }
    }

    pub(super) fn remove(&mut self, r: &Removal) -> bool {
        match r {
            Removal::Address(name) => {
                let uid = WorkloadUid(name.as_str().into());
                if self.remove_workload(&uid) {
                    return true;
                }
                match ServiceKey::parse(name) {
                    Ok(key) => self.remove_service(&key),
                    Err(_) => false,
                }
            }
            Removal::Policy(key) => self.remove_policy(key),
        }
    }

    fn upsert_workload(&mut self, w: Workload) {
        self.remove_workload(&w.uid);
        for addr in w.network_addrs() {
            index_add(&mut self.workload_by_addr, addr, &w.uid);
        }
        for (svc, ports) in &w.services {
            let ep = Arc::new(Endpoint {
                workload: w.uid.clone(),
                ports: ports.clone(),
            });
            let mut eps = self.endpoints.get(svc).cloned().unwrap_or_default();
            eps.insert(w.uid.clone(), ep);
            self.endpoints.insert(svc.clone(), eps);
        }
        let node: Arc<str> = w.node.as_str().into();
        let mut on_node = self
            .workloads_by_node
            .get(&node)
            .cloned()
            .unwrap_or_default();
        on_node.insert(w.uid.clone());
        self.workloads_by_node.insert(node, on_node);
        self.workloads.insert(w.uid.clone(), Arc::new(w));
    }

    fn remove_workload(&mut self, uid: &WorkloadUid) -> bool {
        let Some(old) = self.workloads.remove(uid) else {
            return false;
        };
        for addr in old.network_addrs() {
            index_remove(&mut self.workload_by_addr, &addr, uid);
        }
        if let Some(on_node) = self.workloads_by_node.get_mut(old.node.as_str()) {
            on_node.remove(uid);
            if on_node.is_empty() {
                self.workloads_by_node.remove(old.node.as_str());
            }
        }
        for svc in old.services.keys() {
            if let Some(eps) = self.endpoints.get_mut(svc) {
                eps.remove(uid);
                if eps.is_empty() {
                    self.endpoints.remove(svc);
                }
            }
        }
        true
    }

    /// An update keeps the service's place among the holders of its hostname and of the VIPs it
    /// keeps: "the first held" (DNS answers, VIP routing) means the first registered, and a
    /// control plane resending its state reorders nothing.
    fn upsert_service(&mut self, s: Service) {
        let key = s.key();
        match self.services.get(&key).cloned() {
            Some(old) => {
                let (before, after): (std::collections::HashSet<&NetworkAddr>, _) = (
                    old.vips.iter().collect(),
                    s.vips.iter().collect::<std::collections::HashSet<_>>(),
                );
                for vip in before.difference(&after) {
                    index_remove(&mut self.service_by_vip, *vip, &key);
                }
                for vip in after.difference(&before) {
                    index_add(&mut self.service_by_vip, (*vip).clone(), &key);
                }
                // The key is `<namespace>/<hostname>`: its hostname entry stays as it is.
                self.cidr_services.remove(&key);
            }
            None => {
                for vip in &s.vips {
                    index_add(&mut self.service_by_vip, vip.clone(), &key);
                }
                index_add(&mut self.service_by_host, s.hostname.as_str().into(), &key);
            }
        }
        let s = Arc::new(s);
        if !s.cidr_vips.is_empty() {
            self.cidr_services.insert(key.clone(), s.clone());
        }
        self.services.insert(key, s);
    }

    fn remove_service(&mut self, key: &ServiceKey) -> bool {
        let Some(old) = self.services.remove(key) else {
            return false;
        };
        for vip in &old.vips {
            index_remove(&mut self.service_by_vip, vip, key);
        }
        index_remove(&mut self.service_by_host, old.hostname.as_str(), key);
        self.cidr_services.remove(key);
        true
    }

    fn upsert_policy(&mut self, p: Authorization) {
        let key = p.key();
        self.remove_policy(&key);
        let p = Arc::new(p);
        match p.scope {
            PolicyScope::Global => {
                self.global_policies.insert(key.clone(), p.clone());
            }
            PolicyScope::Namespace => {
                let ns: Arc<str> = p.namespace.as_str().into();
                let mut set = self.policies_by_ns.get(&ns).cloned().unwrap_or_default();
                set.insert(key.clone(), p.clone());
                self.policies_by_ns.insert(ns, set);
            }
            PolicyScope::WorkloadSelector => {}
        }
        self.policies.insert(key, p);
    }

    fn remove_policy(&mut self, key: &PolicyKey) -> bool {
        let Some(old) = self.policies.remove(key) else {
            return false;
        };
        self.global_policies.remove(key);
        if let Some(set) = self.policies_by_ns.get_mut(old.namespace.as_str()) {
            set.remove(key);
            if set.is_empty() {
                self.policies_by_ns.remove(old.namespace.as_str());
            }
        }
        true
    }
}

/// Adds `v` as the newest holder of `k` in an index whose keys may be shared.
fn index_add<K, V>(index: &mut HashMap<K, Vec<V>>, k: K, v: &V)
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    let mut holders = index.get(&k).cloned().unwrap_or_default();
    holders.push(v.clone());
    index.insert(k, holders);
}

/// Removes `v` from the holders of `k`; the previous holder, if any, answers lookups again.
fn index_remove<K, Q, V>(index: &mut HashMap<K, Vec<V>>, k: &Q, v: &V)
where
    K: Hash + Eq + Clone + Borrow<Q>,
    Q: Hash + Eq + ?Sized,
    V: Clone + PartialEq,
{
    if let Some(holders) = index.get_mut(k) {
        holders.retain(|h| h != v);
        if holders.is_empty() {
            index.remove(k);
        }
    }
}
