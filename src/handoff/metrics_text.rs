//! A draining predecessor's metrics inside its successor's exposition, every sample labelled
//! `l4mesh_process="predecessor"`: one scrape of the node's metrics port sees both processes as
//! distinct series (a counter of the new process does not jump by the old one's count, and none
//! resets), grouped by family as OpenMetrics requires.
//!
//! Works on the text either process encodes (OpenMetrics or Prometheus text 0.0.4, the same
//! format for both): a family starts at its first `# HELP`/`# TYPE`/`# UNIT` line, its samples
//! follow; `# EOF` ends OpenMetrics text.

/// The label that tells the predecessor's series apart, and its value.
pub const LABEL: &str = "l4mesh_process";
pub const VALUE: &str = "predecessor";

struct Family<'a> {
    name: &'a str,
    lines: Vec<&'a str>,
    samples: Vec<&'a str>,
}

/// The families of an exposition in order, and whether it ended with `# EOF`.
fn families(text: &str) -> (Vec<Family<'_>>, bool) {
    let mut out: Vec<Family<'_>> = Vec::new();
    let mut eof = false;
    for line in text.lines() {
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let meta = ["# HELP ", "# TYPE ", "# UNIT "]
            .iter()
            .find_map(|p| line.strip_prefix(p));
        let name = match meta {
            Some(rest) => rest.split(' ').next().unwrap_or(""),
            None => sample_name(line),
        };
        // A sample continues the current family when it is one of its series (`_total`,
        // `_bucket`, ...); a comment line only when it names the same family.
        let continues = out.last().is_some_and(|f| match meta {
            Some(_) => f.name == name,
            None => name.starts_with(f.name),
        });
        if !continues {
            out.push(Family {
                name,
                lines: Vec::new(),
                samples: Vec::new(),
            });
        }
        if let Some(f) = out.last_mut() {
            match meta {
                Some(_) => f.lines.push(line),
                None => f.samples.push(line),
            }
        }
    }
    (out, eof)
}

impl Family<'_> {
    /// Its `# TYPE` (`counter`, `gauge`, ...), if declared.
    fn kind(&self) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix("# TYPE "))
            .and_then(|rest| rest.split(' ').nth(1))
    }
}

fn sample_name(line: &str) -> &str {
    let end = line.find(['{', ' ']).unwrap_or(line.len());
    &line[..end]
}

/// `line` with the predecessor's label first among its labels.
fn relabel(line: &str, out: &mut String) {
    let name = sample_name(line);
    let rest = &line[name.len()..];
    out.push_str(name);
    out.push('{');
    out.push_str(LABEL);
    out.push_str("=\"");
    out.push_str(VALUE);
    out.push('"');
    match rest.strip_prefix('{') {
        Some(r) if r.starts_with('}') => out.push_str(r),
        Some(r) => {
            out.push(',');
            out.push_str(r);
        }
        None => {
            out.push('}');
            out.push_str(rest);
        }
    }
    out.push('\n');
}

/// `own` with `predecessor`'s samples added to their families (relabelled), and the families
/// only the predecessor has after the rest. A family whose type changed between the two versions
/// keeps only this process's samples (one family cannot have two types).
pub fn merge(own: &str, predecessor: &str) -> String {
    let (mine, eof) = families(own);
    let (theirs, _) = families(predecessor);
    let mut out = String::with_capacity(own.len() + predecessor.len() * 11 / 10);
    let mut used = vec![false; theirs.len()];
    for f in &mine {
        for l in f.lines.iter().chain(&f.samples) {
            out.push_str(l);
            out.push('\n');
        }
        for (i, t) in theirs.iter().enumerate() {
            if t.name == f.name {
                used[i] = true;
                if t.kind() == f.kind() {
                    t.samples.iter().for_each(|s| relabel(s, &mut out));
                }
            }
        }
    }
    for (t, _) in theirs.iter().zip(&used).filter(|(_, u)| !**u) {
        for l in &t.lines {
            out.push_str(l);
            out.push('\n');
        }
        t.samples.iter().for_each(|s| relabel(s, &mut out));
    }
    if eof {
        out.push_str("# EOF\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predecessor_samples_join_their_families_with_a_label() {
        let own = "# HELP istio_tcp_connections_opened Opened.\n\
                   # TYPE istio_tcp_connections_opened counter\n\
                   istio_tcp_connections_opened_total{reporter=\"destination\"} 3\n\
                   # HELP l4mesh_up Up.\n\
                   # TYPE l4mesh_up gauge\n\
                   l4mesh_up 1\n\
                   # EOF\n";
        let old = "# HELP istio_tcp_connections_opened Opened.\n\
                   # TYPE istio_tcp_connections_opened counter\n\
                   istio_tcp_connections_opened_total{reporter=\"destination\"} 40\n\
                   # HELP l4mesh_up Up.\n\
                   # TYPE l4mesh_up gauge\n\
                   l4mesh_up{} 1\n\
                   # HELP old_only Gone in the new version.\n\
                   # TYPE old_only histogram\n\
                   old_only_bucket{le=\"+Inf\"} 2\n\
                   old_only_sum 0.5\n\
                   old_only_count 2\n\
                   # EOF\n";
        let merged = merge(own, old);
        assert_eq!(
            merged,
            "# HELP istio_tcp_connections_opened Opened.\n\
             # TYPE istio_tcp_connections_opened counter\n\
             istio_tcp_connections_opened_total{reporter=\"destination\"} 3\n\
             istio_tcp_connections_opened_total{l4mesh_process=\"predecessor\",reporter=\"destination\"} 40\n\
             # HELP l4mesh_up Up.\n\
             # TYPE l4mesh_up gauge\n\
             l4mesh_up 1\n\
             l4mesh_up{l4mesh_process=\"predecessor\"} 1\n\
             # HELP old_only Gone in the new version.\n\
             # TYPE old_only histogram\n\
             old_only_bucket{l4mesh_process=\"predecessor\",le=\"+Inf\"} 2\n\
             old_only_sum{l4mesh_process=\"predecessor\"} 0.5\n\
             old_only_count{l4mesh_process=\"predecessor\"} 2\n\
             # EOF\n"
        );
        // Prometheus text 0.0.4 has no EOF line, and none is added.
        let plain = merge("a 1\n", "a 2\nb 3\n");
        assert_eq!(
            plain,
            "a 1\na{l4mesh_process=\"predecessor\"} 2\nb{l4mesh_process=\"predecessor\"} 3\n"
        );
        assert_eq!(merge(own, ""), own);
        // A family whose type changed keeps this process's samples only.
        let retyped = "# TYPE l4mesh_up counter\nl4mesh_up_total 5\n# EOF\n";
        assert_eq!(merge(own, retyped), own);
    }
}
