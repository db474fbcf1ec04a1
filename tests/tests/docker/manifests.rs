//! The compose file, the Kubernetes manifests and the Dockerfile hold
//! together, and their container arguments are accepted by paramd.

use std::collections::HashMap;
use std::time::Duration;

use paramd_tests::binary;
use serde::Deserialize;
use serde_yaml::Value as Yaml;

use crate::harness::{docker_or_skip, install_promtool, run_bounded};
use crate::repo;

fn yaml_file(rel: &str) -> Yaml {
    let path = repo().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let mut v: Yaml = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"));
    // `<<: *anchor` merge keys, as compose applies them.
    v.apply_merge().unwrap_or_else(|e| panic!("{rel}: {e}"));
    v
}

pub(crate) fn s<'a>(v: &'a Yaml, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string: {:?}", at(v, path)))
}

/// The value at a dotted path (`spec.template.metadata`; `[n]` indexes).
pub(crate) fn at<'a>(v: &'a Yaml, path: &str) -> &'a Yaml {
    let mut cur = v;
    for part in path.split('.') {
        cur = match part.strip_prefix('[').and_then(|p| p.strip_suffix(']')) {
            Some(n) => &cur[n.parse::<usize>().expect("index")],
            None => &cur[part],
        };
        assert!(!cur.is_null(), "{path}: nothing at {part}");
    }
    cur
}

/// `${VAR:-default}` and `${VAR}` as docker-compose reads them with an
/// empty environment.
fn interpolate(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closed ${") + start;
        let inner = &rest[start + 2..end];
        if let Some((_, default)) = inner.split_once(":-") {
            out.push_str(default);
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// `paramd --print-config args...` with exactly `env` of the PARAMD_*
/// variables: the effective config, or why paramd refused it.
fn print_config(args: &[String], env: &[(String, String)]) -> Result<String, String> {
    let mut cmd = std::process::Command::new("timeout");
    cmd.arg("30").arg(binary("paramd")).arg("--print-config");
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("PARAMD_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let out = cmd.output().expect("run paramd --print-config");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{:?}: {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The config paramd prints holds `key = value`.
fn assert_config_has(config: &str, key: &str, value: &str) {
    assert!(
        config.lines().any(|l| l
            .split_once('=')
            .is_some_and(|(k, v)| k.trim() == key && v.trim() == value)),
        "{key} = {value} is not in\n{config}"
    );
}

/// Shard `i`'s arguments and environment as paramd takes them: it
/// accepts them, and they make it shard `i` of `cluster` with its
/// checkpoints on the volume.
fn check_shard_args(
    what: &str,
    i: usize,
    args: &[String],
    env: &[(String, String)],
    cluster: &[&str],
) {
    let config = print_config(args, env)
        .unwrap_or_else(|e| panic!("{what}: paramd refuses shard {i}'s arguments {args:?}: {e}"));
    assert_config_has(&config, "shard_index", &i.to_string());
    let list = |urls: &[String]| {
        let quoted: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
        format!("[{}]", quoted.join(", "))
    };
    let urls: Vec<String> = cluster.iter().map(|u| (*u).to_owned()).collect();
    assert_config_has(&config, "cluster", &list(&urls));
    // The shards call each other on their peer port, never on the workers'.
    let peers: Vec<String> = urls.iter().map(|u| u.replace(":50051", ":50052")).collect();
    assert_config_has(&config, "peers", &list(&peers));
    assert_config_has(&config, "peer_listen", "\"0.0.0.0:50052\"");
    assert_config_has(&config, "checkpoint_dir", "\"/var/lib/paramd\"");
}

#[test]
fn the_compose_file_is_a_three_shard_cluster_with_prometheus_and_grafana() {
    let compose = yaml_file("deploy/compose.yaml");
    let services = at(&compose, "services");
    let mut ips = Vec::new();
    for i in 0..3 {
        let name = format!("shard{i}");
        let svc = at(services, &name);
        assert_eq!(interpolate(s(svc, "image")), "paramd:latest");
        let volume = format!("checkpoints-{i}:/var/lib/paramd");
        assert_eq!(at(svc, "volumes.[0]").as_str(), Some(volume.as_str()));
        assert!(
            at(&compose, "volumes")
                .as_mapping()
                .expect("volumes")
                .contains_key(format!("checkpoints-{i}")),
            "checkpoints-{i} is declared"
        );
        ips.push(interpolate(s(svc, "networks.paramd.ipv4_address")));
        let args: Vec<String> = at(svc, "command")
            .as_sequence()
            .expect("command is a list")
            .iter()
            .map(|a| a.as_str().expect("string").to_owned())
            .collect();
        assert_eq!(args, ["--shard-index", &i.to_string()]);
        let env: Vec<(String, String)> = at(svc, "environment")
            .as_mapping()
            .expect("environment")
            .iter()
            .map(|(k, v)| {
                let v = v
                    .as_str()
                    .map(str::to_owned)
                    .or_else(|| v.as_u64().map(|n| n.to_string()))
                    .expect("a value");
                (k.as_str().expect("name").to_owned(), interpolate(&v))
            })
            .collect();
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{name} has no {k}"))
        };
        let cluster: Vec<String> = get("PARAMD_CLUSTER")
            .split(',')
            .map(str::to_owned)
            .collect();
        assert_eq!(cluster.len(), 3, "{cluster:?}");
        assert_eq!(cluster[i], format!("http://{}:50051", ips[i]));
        // docker stops it after stop_grace_period: the shutdown grace fits.
        let grace: f64 = get("PARAMD_SHUTDOWN_GRACE").parse().expect("seconds");
        let stop: f64 = s(svc, "stop_grace_period")
            .strip_suffix('s')
            .expect("seconds")
            .parse()
            .expect("seconds");
        assert!(grace + 5.0 <= stop, "grace {grace} s, stop after {stop} s");
        let urls: Vec<&str> = cluster.iter().map(String::as_str).collect();
        check_shard_args("compose", i, &args, &env, &urls);
    }
    // Compose stops the coordinator first: its final checkpoint needs the
    // other shards.
    let deps: Vec<&str> = at(services, "shard0.depends_on")
        .as_sequence()
        .expect("a list")
        .iter()
        .map(|d| d.as_str().expect("a name"))
        .collect();
    assert_eq!(deps, ["shard1", "shard2"]);
    let subnet = interpolate(s(&compose, "networks.paramd.ipam.config.[0].subnet"));
    let net = subnet.strip_suffix(".0/24").expect("a /24");
    assert!(ips.iter().all(|ip| ip.starts_with(&format!("{net}."))));

    // Prometheus scrapes every shard's HTTP port, keeping paramd's `job`.
    let prom_svc = at(services, "prometheus");
    assert!(s(prom_svc, "image").starts_with("prom/prometheus"));
    let prom = yaml_file("deploy/prometheus/prometheus.yml");
    let scrape = at(&prom, "scrape_configs.[0]");
    assert_eq!(at(scrape, "honor_labels").as_bool(), Some(true));
    let targets: Vec<&str> = at(scrape, "static_configs.[0].targets")
        .as_sequence()
        .expect("targets")
        .iter()
        .map(|t| t.as_str().expect("string"))
        .collect();
    assert_eq!(targets, ["shard0:9464", "shard1:9464", "shard2:9464"]);

    install_promtool();
    let prom_path = repo().join("deploy/prometheus/prometheus.yml");
    let prom_path = prom_path.display().to_string();
    if let Err(e) = run_bounded(
        "promtool",
        &["check", "config", &prom_path],
        Duration::from_secs(60),
    ) {
        panic!("promtool refuses deploy/prometheus/prometheus.yml: {e}");
    }

    // Grafana mounts files that exist.
    let grafana = at(services, "grafana");
    assert!(s(grafana, "image").starts_with("grafana/grafana"));
    for v in at(grafana, "volumes").as_sequence().expect("volumes") {
        let src = v.as_str().expect("string").split(':').next().expect("src");
        if let Some(rel) = src.strip_prefix("./") {
            assert!(repo().join("deploy").join(rel).exists(), "{src} is missing");
        }
    }
    // Every published port is on loopback only.
    for (name, svc) in services.as_mapping().expect("services") {
        if let Some(ports) = svc.get("ports").and_then(Yaml::as_sequence) {
            for p in ports {
                assert!(
                    p.as_str().is_some_and(|p| p.starts_with("127.0.0.1:")),
                    "{name:?} publishes {p:?} beyond loopback"
                );
            }
        }
    }

    // docker-compose's own validation, when it is installed.
    if docker_or_skip() {
        let file = repo().join("deploy/compose.yaml");
        let file = file.display().to_string();
        match run_bounded(
            "docker-compose",
            &["-f", &file, "config"],
            Duration::from_secs(60),
        ) {
            Ok(out) => assert!(out.contains("shard2"), "{out}"),
            Err(e) if e.contains("cannot run") => {
                eprintln!("docker-compose is not installed: its validation was skipped")
            }
            Err(e) => panic!("docker-compose refuses deploy/compose.yaml: {e}"),
        }
    }
}

/// The Kubernetes objects of `deploy/k8s`, by kind.
fn k8s_objects() -> HashMap<String, Yaml> {
    let kustomization = yaml_file("deploy/k8s/kustomization.yaml");
    let mut objects = HashMap::new();
    for r in at(&kustomization, "resources")
        .as_sequence()
        .expect("resources")
    {
        let rel = format!("deploy/k8s/{}", r.as_str().expect("file name"));
        let text = std::fs::read_to_string(repo().join(&rel)).expect(&rel);
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Yaml::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: {e}"));
            assert!(s(&v, "apiVersion").contains('v'), "{rel}");
            let kind = s(&v, "kind").to_owned();
            objects.insert(kind, v);
        }
    }
    objects
}

#[test]
fn the_statefulset_finds_its_shards_through_the_headless_service() {
    let objects = k8s_objects();
    let sts = &objects["StatefulSet"];
    let svc = &objects["Service"];
    let cm = &objects["ConfigMap"];
    let name = s(sts, "metadata.name");
    let service = s(svc, "metadata.name");
    assert_eq!(s(sts, "spec.serviceName"), service);
    assert_eq!(s(svc, "spec.clusterIP"), "None", "headless");
    assert_eq!(
        at(svc, "spec.publishNotReadyAddresses").as_bool(),
        Some(true)
    );
    let labels = at(sts, "spec.template.metadata.labels");
    for (k, v) in at(sts, "spec.selector.matchLabels")
        .as_mapping()
        .expect("matchLabels")
        .iter()
        .chain(at(svc, "spec.selector").as_mapping().expect("selector"))
    {
        assert_eq!(&labels[k], v, "the pods carry {k:?}");
    }

    let pod = at(sts, "spec.template.spec");
    let ctr = at(pod, "containers.[0]");
    let port = |n: &str| {
        at(ctr, "ports")
            .as_sequence()
            .expect("ports")
            .iter()
            .find(|p| p["name"].as_str() == Some(n))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no {n} port"))
    };
    let (grpc, peer, metrics) = (port("grpc"), port("peer"), port("metrics"));
    assert_eq!(
        (grpc, peer, metrics),
        (50051, 50052, 9464),
        "the image's ports"
    );
    // Only the shards reach the peer port.
    let policy = &objects["NetworkPolicy"];
    let rules = at(policy, "spec.ingress").as_sequence().expect("rules");
    for rule in rules {
        let ports: Vec<&str> = rule["ports"]
            .as_sequence()
            .expect("ports")
            .iter()
            .map(|p| p["port"].as_str().expect("a port name"))
            .collect();
        if ports.contains(&"peer") {
            assert_eq!(ports, ["peer"], "the peer port has a rule of its own");
            assert_eq!(
                &rule["from"][0]["podSelector"]["matchLabels"],
                at(sts, "spec.selector.matchLabels"),
                "only the shards reach the peer port"
            );
        }
    }
    assert!(
        rules
            .iter()
            .any(|r| r["ports"][0]["port"].as_str() == Some("peer")),
        "the NetworkPolicy names the peer port"
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(
            at(ctr, &format!("{probe}.grpc.port")).as_u64(),
            Some(grpc),
            "{probe} asks the gRPC health service"
        );
    }
    let ann = at(sts, "spec.template.metadata.annotations");
    assert_eq!(ann["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(
        ann["prometheus.io/port"].as_str(),
        Some(metrics.to_string().as_str())
    );
    assert_eq!(ann["prometheus.io/path"].as_str(), Some("/metrics"));
    assert!(!at(ctr, "resources.requests.cpu").is_null());
    assert!(!at(ctr, "resources.requests.memory").is_null());
    assert_eq!(
        at(pod, "securityContext.runAsNonRoot").as_bool(),
        Some(true)
    );
    assert_eq!(at(pod, "securityContext.runAsUser").as_u64(), Some(10001));

    // Checkpoints on the claim template's volume, config from the ConfigMap.
    let mounts = at(ctr, "volumeMounts").as_sequence().expect("mounts");
    let mount = |n: &str| {
        mounts
            .iter()
            .find(|m| m["name"].as_str() == Some(n))
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("no mount of {n}"))
    };
    let claim = s(sts, "spec.volumeClaimTemplates.[0].metadata.name");
    assert_eq!(mount(claim), "/var/lib/paramd");
    let config_volume = at(pod, "volumes")
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["configMap"]["name"].as_str() == Some(s(cm, "metadata.name")))
        .expect("a volume of the ConfigMap");
    let config_dir = mount(config_volume["name"].as_str().expect("name"));
    let toml = cm["data"]["paramd.toml"]
        .as_str()
        .expect("the ConfigMap holds paramd.toml");

    // Shard index from the pod's ordinal, cluster from the service's names.
    let env = at(ctr, "env").as_sequence().expect("env");
    let var = |n: &str| {
        env.iter()
            .find(|e| e["name"].as_str() == Some(n))
            .unwrap_or_else(|| panic!("no {n}"))
    };
    assert_eq!(
        var("PARAMD_SHARD_INDEX")["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.labels['apps.kubernetes.io/pod-index']")
    );
    assert_eq!(
        var("POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.namespace")
    );
    let replicas = at(sts, "spec.replicas").as_u64().expect("replicas") as usize;
    let namespace = "fleet";
    let cluster = var("PARAMD_CLUSTER")["value"]
        .as_str()
        .expect("value")
        .replace("$(POD_NAMESPACE)", namespace);
    let urls: Vec<&str> = cluster.split(',').collect();
    assert_eq!(urls.len(), replicas, "one URL per replica: {urls:?}");
    for (i, u) in urls.iter().enumerate() {
        assert_eq!(
            *u,
            format!("http://{name}-{i}.{service}.{namespace}.svc:{grpc}")
        );
    }

    // The shutdown grace fits in the termination grace period.
    let grace: f64 = toml
        .lines()
        .find_map(|l| l.strip_prefix("shutdown_grace = "))
        .expect("shutdown_grace")
        .parse()
        .expect("seconds");
    let period = at(pod, "terminationGracePeriodSeconds")
        .as_u64()
        .expect("seconds") as f64;
    assert!(
        grace + 5.0 <= period,
        "grace {grace} s, killed after {period} s"
    );

    // Every pod's arguments, environment and config file, as paramd sees
    // them.
    let dir = tempfile::tempdir().expect("tempdir");
    let args: Vec<String> = at(ctr, "args")
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string").to_owned())
        .collect();
    let config_path = args
        .iter()
        .position(|a| a == "--config")
        .map(|p| &args[p + 1])
        .expect("--config FILE");
    let key = config_path
        .strip_prefix(&format!("{config_dir}/"))
        .expect("the config file is in the ConfigMap's mount");
    assert!(cm["data"][key].is_string(), "the ConfigMap holds {key}");
    let local = dir.path().join(key);
    std::fs::write(&local, toml).expect("write config");
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if a == config_path {
                local.display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let namespaced = |n: &str| {
        var(n)["value"]
            .as_str()
            .unwrap_or_else(|| panic!("{n} has a value"))
            .replace("$(POD_NAMESPACE)", namespace)
    };
    for i in 0..replicas {
        let env = vec![
            ("PARAMD_SHARD_INDEX".to_owned(), i.to_string()),
            ("PARAMD_CLUSTER".to_owned(), cluster.clone()),
            (
                "PARAMD_PEER_LISTEN".to_owned(),
                namespaced("PARAMD_PEER_LISTEN"),
            ),
            ("PARAMD_PEERS".to_owned(), namespaced("PARAMD_PEERS")),
        ];
        check_shard_args("k8s", i, &args, &env, &urls);
    }
}

#[test]
fn the_dockerfile_runtime_stage_is_what_the_offline_script_builds() {
    let text = std::fs::read_to_string(repo().join("deploy/Dockerfile")).expect("Dockerfile");
    let marker = "FROM debian:bookworm-slim AS runtime";
    assert_eq!(
        text.lines().filter(|l| *l == marker).count(),
        1,
        "build-image.sh cuts the runtime stage at this line"
    );
    let runtime: Vec<&str> = text.lines().skip_while(|l| *l != marker).collect();
    for l in &runtime {
        if l.starts_with("COPY") {
            assert!(
                l.starts_with("COPY --from=build "),
                "the runtime stage copies only from the build stage: {l}"
            );
        }
        assert!(
            !l.starts_with("FROM") || *l == marker,
            "one runtime stage: {l}"
        );
    }
    for needed in [
        "USER 10001:10001",
        "ENTRYPOINT [\"paramd\"]",
        "EXPOSE 50051 50052 9464",
        "VOLUME [\"/var/lib/paramd\"]",
    ] {
        assert!(runtime.contains(&needed), "the runtime stage has {needed}");
    }
    assert!(runtime.iter().any(|l| l.starts_with("HEALTHCHECK")));
    assert!(
        text.lines()
            .any(|l| l.starts_with("FROM rust:") && l.ends_with(" AS build")),
        "a Rust build stage"
    );
}
