//! Flags and environment into `Config`: parsing, defaults, and the errors for bad values.

use super::*;

#[test]
fn durations() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert!(parse_duration("ten").is_err());
    assert!(parse_duration("5d").is_err());
}

#[test]
fn flags_into_config() {
    let args = Args::try_parse_from([
        "l4mesh",
        "--node-name",
        "n1",
        "--enable-socks5",
        "false",
        "--proxy-workload-info",
        "default/client/sa",
    ])
    .unwrap();
    let c = args.into_config().unwrap();
    assert_eq!(c.node_name, "n1");
    assert_eq!(c.socks5_addr, None);
    assert_eq!(c.workload_info.unwrap().service_account, "sa");
    assert_eq!(c.source, Source::EmbeddedDefault);
    assert_eq!(c.hbone_addr, "0.0.0.0:15008".parse().unwrap());
    let moved = Args::try_parse_from(["l4mesh", "--hbone-addr", "10.0.0.1:15009"]).unwrap();
    let c = moved.into_config().unwrap();
    assert_eq!(c.hbone_addr, "10.0.0.1:15009".parse().unwrap());
}

#[test]
fn bad_flags_are_named() {
    let e = Args::try_parse_from(["l4mesh", "--proxy-workload-info", "a/b"]).unwrap_err();
    assert!(
        e.to_string()
            .contains("<namespace>/<name>/<service account>"),
        "{e}"
    );
    let e = Args::try_parse_from(["l4mesh", "--xds-address", "ftp://istiod:15012"])
        .unwrap()
        .into_config()
        .unwrap_err();
    assert!(e.to_string().contains("http:// or https://"), "{e}");
    // Without a scheme, https is meant (as ztunnel reads it).
    let c = Args::try_parse_from(["l4mesh", "--xds-address", "istiod:15012"])
        .unwrap()
        .into_config()
        .unwrap();
    match c.source {
        Source::Xds(x) => assert_eq!(x.address, "https://istiod:15012"),
        other => panic!("{other:?}"),
    }
    let e = Args::try_parse_from(["l4mesh", "proxy", "envoy"])
        .unwrap()
        .into_config()
        .unwrap_err();
    assert!(e.to_string().contains("expected `proxy ztunnel`"), "{e}");
    assert!(Args::try_parse_from(["l4mesh", "proxy", "ztunnel"])
        .unwrap()
        .into_config()
        .is_ok());
    let e = Args::try_parse_from([
        "l4mesh",
        "--xds-address",
        "http://127.0.0.1:15010",
        "--local-xds-path",
        "/tmp/x.yaml",
    ])
    .unwrap()
    .into_config()
    .unwrap_err();
    assert!(e.to_string().contains("one source"), "{e}");
}

#[test]
fn h2_tuning_flags_and_limits() {
    let c = Args::try_parse_from(["l4mesh"])
        .unwrap()
        .into_config()
        .unwrap();
    assert_eq!(c.h2, crate::proxy::H2Tuning::default());
    let c = Args::try_parse_from([
        "l4mesh",
        "--pool-max-streams-per-connection",
        "7",
        "--pool-unused-release-timeout",
        "30s",
        "--http2-frame-size",
        "16384",
        "--http2-stream-window-size",
        "2147483647",
    ])
    .unwrap()
    .into_config()
    .unwrap();
    assert_eq!(c.h2.max_streams_per_connection, 7);
    assert_eq!(c.h2.unused_release_timeout, Duration::from_secs(30));
    assert_eq!(c.h2.frame_size, 16384);
    assert_eq!(c.h2.stream_window, (1 << 31) - 1);
    let refused = |flags: &[&str]| {
        let mut argv = vec!["l4mesh"];
        argv.extend_from_slice(flags);
        Args::try_parse_from(argv)
            .unwrap()
            .into_config()
            .unwrap_err()
            .to_string()
    };
    let e = refused(&["--pool-max-streams-per-connection", "0"]);
    assert!(e.contains("POOL_MAX_STREAMS_PER_CONNECTION"), "{e}");
    for bad in ["16383", "16777216"] {
        let e = refused(&["--http2-frame-size", bad]);
        assert!(e.contains("HTTP2_FRAME_SIZE") && e.contains(bad), "{e}");
    }
    assert!(validate_h2(&crate::proxy::H2Tuning {
        frame_size: 16 * 1024 * 1024 - 1,
        ..Default::default()
    })
    .is_ok());
    let e = refused(&["--http2-connection-window-size", "2147483648"]);
    assert!(e.contains("HTTP2_CONNECTION_WINDOW_SIZE"), "{e}");
    let e = refused(&["--http2-stream-window-size", "0"]);
    assert!(e.contains("HTTP2_STREAM_WINDOW_SIZE"), "{e}");
}

#[test]
fn xds_source() {
    let c = Args::try_parse_from([
        "l4mesh",
        "--xds-address",
        "https://istiod.istio-system.svc:15012",
        "--xds-root-ca",
        "SYSTEM",
    ])
    .unwrap()
    .into_config()
    .unwrap();
    match c.source {
        Source::Xds(x) => {
            assert_eq!(x.root_ca, Some(RootCa::System));
            assert_eq!(x.address, "https://istiod.istio-system.svc:15012");
        }
        other => panic!("expected xDS, got {other:?}"),
    }
    assert_eq!(
        RootCa::parse("/etc/root.pem"),
        RootCa::File("/etc/root.pem".into())
    );
    assert!(matches!(
        RootCa::parse("-----BEGIN CERTIFICATE-----\nx"),
        RootCa::Pem(_)
    ));
}

#[test]
fn otel_is_off_by_default_and_validated_when_on() {
    let c = Args::try_parse_from(["l4mesh"])
        .unwrap()
        .into_config()
        .unwrap();
    assert_eq!(c.otel, None);
    assert_eq!(Config::local("127.0.0.1".parse().unwrap()).otel, None);
    let c = Args::try_parse_from([
        "l4mesh",
        "--otel-exporter-otlp-endpoint",
        "http://otel-collector.observability:4317",
        "--otel-traces-sampler-arg",
        "0.25",
        "--otel-bsp-schedule-delay",
        "200",
    ])
    .unwrap()
    .into_config()
    .unwrap();
    let o = c.otel.unwrap();
    assert_eq!(o.endpoint, "http://otel-collector.observability:4317");
    assert_eq!(o.sampler_ratio, 0.25);
    assert_eq!(o.service_name, "l4mesh");
    assert_eq!(o.schedule_delay, Duration::from_millis(200));

    let bad = |flags: &[&str]| {
        let mut argv = vec!["l4mesh"];
        argv.extend_from_slice(flags);
        Args::try_parse_from(argv)
            .unwrap()
            .into_config()
            .unwrap_err()
            .to_string()
    };
    let e = bad(&["--otel-exporter-otlp-endpoint", "otel-collector:4317"]);
    assert!(
        e.contains("OTEL_EXPORTER_OTLP_ENDPOINT must be http(s)://host[:port]")
            && e.contains("\"otel-collector:4317\""),
        "{e}"
    );
    let e = bad(&[
        "--otel-exporter-otlp-endpoint",
        "http://c:4317",
        "--otel-traces-sampler-arg",
        "2",
    ]);
    assert!(
        e.contains("OTEL_TRACES_SAMPLER_ARG must be a ratio between 0 and 1, found 2"),
        "{e}"
    );
    let e = bad(&[
        "--otel-exporter-otlp-endpoint",
        "http://c:4317",
        "--otel-service-name",
        "",
    ]);
    assert!(e.contains("OTEL_SERVICE_NAME must not be empty"), "{e}");
    // A bad ratio does not matter while OTel is off.
    let c = Args::try_parse_from(["l4mesh", "--otel-traces-sampler-arg", "7"])
        .unwrap()
        .into_config()
        .unwrap();
    assert_eq!(c.otel, None);
}
#[test]
fn metrics_address() {
    let c = Args::try_parse_from(["l4mesh"])
        .unwrap()
        .into_config()
        .unwrap();
    assert_eq!(c.metrics_addr, Some("0.0.0.0:15020".parse().unwrap()));
    let c = Args::try_parse_from(["l4mesh", "--metrics-addr", "127.0.0.1:9000"])
        .unwrap()
        .into_config()
        .unwrap();
    assert_eq!(c.metrics_addr, Some("127.0.0.1:9000".parse().unwrap()));
    let e = Args::try_parse_from(["l4mesh", "--metrics-addr", "15020"]).unwrap_err();
    assert!(e.to_string().contains("--metrics-addr"), "{e}");
    let e = Args::try_parse_from([
        "l4mesh",
        "--metrics-addr",
        "0.0.0.0:15021",
        "--readiness-addr",
        "0.0.0.0:15021",
    ])
    .unwrap()
    .into_config()
    .unwrap_err();
    assert!(
        e.to_string().contains("L4MESH_METRICS_ADDR") && e.to_string().contains("0.0.0.0:15021"),
        "{e}"
    );
    assert_eq!(
        Config::local("127.51.0.1".parse().unwrap()).metrics_addr,
        Some("127.51.0.1:0".parse().unwrap())
    );
}
#[test]
fn enable_orig_src() {
    let c = Args::try_parse_from(["l4mesh"])
        .unwrap()
        .into_config()
        .unwrap();
    assert_eq!(
        c.enable_orig_src, None,
        "unset means: when the kernel allows it"
    );
    let c = Args::try_parse_from(["l4mesh", "--enable-orig-src", "false"])
        .unwrap()
        .into_config()
        .unwrap();
    assert_eq!(c.enable_orig_src, Some(false));
    let e = Args::try_parse_from(["l4mesh", "--enable-orig-src", "maybe"]).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("expected true or false") && msg.contains("maybe"),
        "{msg}"
    );
}

#[test]
fn admin_and_drain_settings() {
    let c = Args::try_parse_from(["l4mesh"])
        .unwrap()
        .into_config()
        .unwrap();
    assert_eq!(c.admin_addr, Some("127.0.0.1:15000".parse().unwrap()));
    assert_eq!(c.connection_termination_deadline, Duration::from_secs(5));
    let c = Args::try_parse_from([
        "l4mesh",
        "--connection-termination-deadline",
        "1500ms",
        "--termination-grace-period-seconds",
        "30",
        "--disable-admin",
        "true",
    ])
    .unwrap()
    .into_config()
    .unwrap();
    assert_eq!(
        c.connection_termination_deadline,
        Duration::from_millis(1500)
    );
    assert_eq!(c.admin_addr, None);
    // From Kubernetes' grace period, as ztunnel: 5 s less above 10 s, else 1 s less, at least 1 s.
    assert_eq!(
        termination_deadline(None, Some(30)),
        Duration::from_secs(25)
    );
    assert_eq!(termination_deadline(None, Some(10)), Duration::from_secs(9));
    assert_eq!(termination_deadline(None, Some(0)), Duration::from_secs(1));
}

#[test]
fn admin_must_be_loopback() {
    let e = Args::try_parse_from(["l4mesh", "--admin-addr", "0.0.0.0:15000"])
        .unwrap()
        .into_config()
        .unwrap_err();
    assert!(matches!(e, ConfigError::AdminNotLoopback(_)), "{e}");
    assert!(e.to_string().contains("loopback"), "{e}");
    assert!(e.to_string().contains("0.0.0.0:15000"), "{e}");
    let e =
        Args::try_parse_from(["l4mesh", "--connection-termination-deadline", "soon"]).unwrap_err();
    assert!(e.to_string().contains("expected a duration"), "{e}");
}

#[test]
fn limits_and_keepalive_as_ztunnel_names_them() {
    let defaults = Args::try_parse_from(["l4mesh"])
        .unwrap()
        .into_config()
        .unwrap();
    assert_eq!(defaults.keepalive, crate::socket::Keepalive::default());
    assert_eq!(defaults.keepalive.time, Duration::from_secs(180));
    assert_eq!(defaults.keepalive.retries, 9);
    assert!(!defaults.keepalive.user_timeout);
    assert_eq!(defaults.max_connections, None);
    assert_eq!(defaults.max_connections_per_source, 0);
    assert_eq!(defaults.http.header_timeout, Duration::from_secs(2));
    assert_eq!(defaults.h2.ping_interval, Duration::from_secs(10));
    let c = Args::try_parse_from([
        "l4mesh",
        "--keepalive-time",
        "30s",
        "--keepalive-interval",
        "5s",
        "--keepalive-retries",
        "3",
        "--user-timeout-enabled",
        "true",
        "--max-connections",
        "1000",
        "--max-connections-per-source",
        "50",
        "--http-header-timeout",
        "500ms",
        "--hbone-idle-timeout",
        "1m",
    ])
    .unwrap()
    .into_config()
    .unwrap();
    assert_eq!(
        c.keepalive.user_timeout(),
        Some(Duration::from_secs(30 + 3 * 5))
    );
    assert_eq!(c.max_connections, Some(1000));
    assert_eq!(c.max_connections_per_source, 50);
    assert_eq!(c.http.header_timeout, Duration::from_millis(500));
    assert_eq!(c.h2.server_idle_timeout, Duration::from_secs(60));
    for (flag, value, name) in [
        ("--keepalive-time", "0s", "KEEPALIVE_TIME"),
        ("--keepalive-time", "500ms", "KEEPALIVE_TIME"),
        ("--keepalive-interval", "40000s", "KEEPALIVE_INTERVAL"),
        ("--keepalive-retries", "0", "KEEPALIVE_RETRIES"),
        ("--keepalive-retries", "200", "KEEPALIVE_RETRIES"),
        ("--http-header-timeout", "0s", "L4MESH_HTTP_HEADER_TIMEOUT"),
        ("--hbone-ping-interval", "0s", "L4MESH_HBONE_PING_INTERVAL"),
    ] {
        let e = Args::try_parse_from(["l4mesh", flag, value])
            .unwrap()
            .into_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains(name), "{e}");
    }
    let e = Args::try_parse_from(["l4mesh", "--http-max-connections", "0"])
        .unwrap()
        .into_config()
        .unwrap_err()
        .to_string();
    assert!(e.contains("L4MESH_HTTP_MAX_CONNECTIONS"), "{e}");
}

#[test]
fn socks5_stays_on_loopback_unless_allowed() {
    let e = Args::try_parse_from(["l4mesh", "--socks5-addr", "0.0.0.0:15080"])
        .unwrap()
        .into_config()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("L4MESH_SOCKS5_ALLOW_REMOTE") && e.contains("0.0.0.0:15080"),
        "{e}"
    );
    let c = Args::try_parse_from([
        "l4mesh",
        "--socks5-addr",
        "0.0.0.0:15080",
        "--socks5-allow-remote",
        "true",
    ])
    .unwrap()
    .into_config()
    .unwrap();
    assert_eq!(c.socks5_addr, Some("0.0.0.0:15080".parse().unwrap()));
    // Disabled SOCKS5 needs no check.
    assert!(Args::try_parse_from([
        "l4mesh",
        "--socks5-addr",
        "0.0.0.0:15080",
        "--enable-socks5",
        "false",
    ])
    .unwrap()
    .into_config()
    .is_ok());
}

#[test]
fn plaintext_control_plane_only_on_loopback_or_when_allowed() {
    let parse = |flags: &[&str]| {
        let mut argv = vec!["l4mesh"];
        argv.extend_from_slice(flags);
        Args::try_parse_from(argv).unwrap().into_config()
    };
    for ok in [
        "http://127.0.0.1:15010",
        "http://localhost:15010",
        "http://[::1]:15010",
        "https://istiod.istio-system.svc:15012",
    ] {
        assert!(parse(&["--xds-address", ok]).is_ok(), "{ok}");
    }
    let e = parse(&["--xds-address", "http://10.0.0.2:15010"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("XDS_ADDRESS") && e.contains("L4MESH_ALLOW_PLAINTEXT_CONTROL_PLANE"),
        "{e}"
    );
    let e = parse(&[
        "--xds-address",
        "https://istiod:15012",
        "--ca-address",
        "http://istiod:15010",
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("CA_ADDRESS"), "{e}");
    assert!(parse(&[
        "--xds-address",
        "http://10.0.0.2:15010",
        "--allow-plaintext-control-plane",
        "true"
    ])
    .is_ok());
}

#[test]
fn shared_mode_takes_the_agent_socket_and_no_workload() {
    let c = Args::try_parse_from([
        "l4mesh",
        "--proxy-mode",
        "shared",
        "--inpod-uds",
        "/run/z.sock",
    ])
    .unwrap()
    .into_config()
    .unwrap();
    let inpod = c.inpod.expect("shared mode has in-pod settings");
    assert_eq!(inpod.uds, std::path::PathBuf::from("/run/z.sock"));
    assert!(inpod.port_reuse, "INPOD_PORT_REUSE defaults to on");
    assert_eq!(c.socks5_addr, None, "no SOCKS5 in shared mode");
    let e = Args::try_parse_from([
        "l4mesh",
        "--proxy-mode",
        "shared",
        "--proxy-workload-info",
        "default/a/sa",
    ])
    .unwrap()
    .into_config()
    .unwrap_err();
    assert!(
        e.to_string().contains("PROXY_WORKLOAD_INFO=default/a/sa"),
        "{e}"
    );
    let c = Args::try_parse_from(["l4mesh"])
        .unwrap()
        .into_config()
        .unwrap();
    assert_eq!(c.inpod, None, "dedicated by default outside Kubernetes");
}

#[test]
fn kubernetes_defaults_reach_the_config_and_flags_still_win() {
    use clap::FromArgMatches;
    let env = |k: &str| (k == "KUBERNETES_SERVICE_HOST").then(|| "10.96.0.1".to_owned());
    let pc = kubernetes::ProxyConfig {
        proxy_admin_port: Some(15100),
        concurrency: Some(3),
        status_port: Some(15090),
        ..Default::default()
    };
    let defaults = kubernetes::defaults(&env, &|_| true, &pc);
    let parse = |argv: &[&str]| {
        let m = Args::command_with(defaults.clone())
            .try_get_matches_from(argv)
            .unwrap();
        Args::from_arg_matches(&m).unwrap().into_config().unwrap()
    };
    let c = parse(&["l4mesh"]);
    assert_eq!(c.proxy_mode, ProxyMode::Shared);
    match &c.source {
        Source::Xds(x) => assert_eq!(x.address, kubernetes::ISTIOD),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.outbound_addr, "[::]:15001".parse().unwrap());
    assert_eq!(c.admin_addr, Some("127.0.0.1:15100".parse().unwrap()));
    assert_eq!(c.metrics_addr, Some("[::]:15090".parse().unwrap()));
    assert_eq!(c.worker_threads, 3);
    let c = parse(&[
        "l4mesh",
        "--proxy-mode",
        "dedicated",
        "--proxy-workload-info",
        "d/a/sa",
    ]);
    assert_eq!(c.proxy_mode, ProxyMode::Dedicated);
}
