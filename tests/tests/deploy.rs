//! deploy/: the Dockerfile's stages and the Kubernetes manifests, checked for the
//! structure a fleet relies on (no cluster runs here; the Dockerfile is built for real by
//! podman in qemu_boot.rs, and the same steps run in qemu/prepare through deploy/build-image).

use ltsp_tests::workspace_root;
use yaml_rust2::{Yaml, YamlLoader};

fn read(rel: &str) -> String {
    std::fs::read_to_string(workspace_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Yaml {
    YamlLoader::load_from_str(&read(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
        .remove(0)
}

#[test]
fn dockerfile_has_the_stages_and_uses_the_shared_steps() {
    let d = read("deploy/Dockerfile");
    let stages: Vec<&str> = d
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .filter_map(|l| l.split(" AS ").nth(1))
        .collect();
    assert_eq!(
        stages,
        ["build", "base", "extras", "image", "squash", "server"]
    );
    // Every file copied from the build context exists.
    for l in d
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = l.split_whitespace().collect();
        for src in &words[1..words.len() - 1] {
            if *src != "." {
                assert!(workspace_root().join(src).exists(), "{l}: {src} missing");
            }
        }
    }
    // The same steps as deploy/build-image: image-setup base, then install with our .deb.
    assert!(d.contains("/tmp/ltsp-setup/image-setup base"));
    assert!(d.contains("image-setup install /tmp/ltsp-setup/ltsp-agent_*.deb"));
    assert!(read("deploy/build-image").contains("image-setup install"));
    assert!(d.contains("mksquashfs /rootfs /out/root.squashfs"));
    // Both append the dm-verity tree the same way (the agent finds it where the squashfs
    // ends) and publish the root hash beside the image.
    let verity = r#"veritysetup format --hash-offset="$size" --data-blocks=$((size / 4096))"#;
    assert!(d.contains(verity), "Dockerfile: {verity}");
    assert!(
        read("deploy/build-image").contains(verity),
        "build-image: {verity}"
    );
    assert!(d.contains("cryptsetup-bin"));
    assert!(
        d.contains("COPY --from=squash /out/root.squashfs /out/root.squashfs.roothash /srv/ltsp/")
    );
    assert!(d.contains("ENTRYPOINT [\"/usr/sbin/ltsp-server\", \"serve\""));
    assert!(d.contains("EXPOSE 69/udp 10809/tcp 8080/tcp"));
}

#[test]
fn dockerfile_base_images_are_build_args_and_the_context_is_small() {
    let d = read("deploy/Dockerfile");
    // A site points the build at its registry's mirrors with these.
    for arg in [
        "ARG DEBIAN=debian:${SUITE}",
        "ARG DEBIAN_SLIM=${DEBIAN}-slim",
        "ARG RUST_IMAGE=rust:1-${SUITE}",
    ] {
        assert!(d.contains(arg), "Dockerfile: {arg}");
    }
    for from in d.lines().filter(|l| l.starts_with("FROM ")) {
        let image = from.split_whitespace().nth(1).unwrap();
        assert!(
            image.starts_with("${") || image == "base",
            "{from}: a base image not chosen by a build ARG"
        );
    }
    // Build output and the QEMU caches (gigabytes) stay out of the build context.
    let ignore = read(".dockerignore");
    for dir in ["target", "qemu/cache", "qemu/work", "fuzz/corpus"] {
        assert!(
            ignore
                .lines()
                .any(|l| l == dir || dir.starts_with(&format!("{l}/"))),
            ".dockerignore: {dir}"
        );
    }
}

#[test]
fn kubernetes_servers_are_redundant_on_the_host_network_with_health_probes() {
    let k = yaml("deploy/kubernetes/kustomization.yaml");
    let resources: Vec<&str> = k["resources"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for r in &resources {
        assert!(
            workspace_root().join("deploy/kubernetes").join(r).exists(),
            "{r}"
        );
    }
    let gen = &k["configMapGenerator"][0];
    assert_eq!(gen["name"].as_str(), Some("ltsp-server"));
    let files: Vec<&str> = gen["files"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(files, ["server.toml", "lts.conf"]);
    // One pinned server image for every replica: one node image everywhere.
    let tag = k["images"][0]["newTag"].as_str().unwrap();
    assert!(!tag.is_empty() && tag != "latest");

    let d = yaml("deploy/kubernetes/deployment.yaml");
    assert_eq!(d["kind"].as_str(), Some("Deployment"));
    assert!(d["spec"]["replicas"].as_i64().unwrap() >= 2);
    let labels = &d["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&d["spec"]["selector"]["matchLabels"], labels);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    assert_eq!(pod["dnsPolicy"].as_str(), Some("ClusterFirstWithHostNet"));
    let anti =
        &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(anti["topologyKey"].as_str(), Some("kubernetes.io/hostname"));
    assert_eq!(&anti["labelSelector"]["matchLabels"], labels);
    assert_eq!(
        d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"].as_i64(),
        Some(1)
    );

    let c = &pod["containers"][0];
    assert_eq!(c["image"].as_str(), k["images"][0]["name"].as_str());
    let port = |name: &str| {
        c["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no port {name}"))["containerPort"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(port("tftp"), 69);
    assert_eq!(port("nbd"), 10809);
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(
            c[probe]["httpGet"]["path"].as_str(),
            Some("/healthz"),
            "{probe}"
        );
        assert_eq!(
            c[probe]["httpGet"]["port"].as_str(),
            Some("http"),
            "{probe}"
        );
    }
    // The probes reach the address the server's configuration listens on.
    let toml_text = read("deploy/kubernetes/server.toml");
    let cfg = ltsp_server::config::parse_file(std::path::Path::new("server.toml"), &toml_text)
        .expect("server.toml parses");
    assert_eq!(cfg.http.listen.unwrap().port() as i64, port("http"));
    // The ConfigMap's files land where the server and the nodes read them.
    let mounts: Vec<(&str, &str)> = c["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|m| Some((m["subPath"].as_str()?, m["mountPath"].as_str().unwrap())))
        .collect();
    assert!(mounts.contains(&("server.toml", "/etc/ltsp/server.toml")));
    let tftp_root = cfg.tftp.root.unwrap();
    let kernel_dir = std::path::Path::new(cfg.boot.kernel.as_deref().unwrap())
        .parent()
        .unwrap();
    let lts_conf = tftp_root.join(kernel_dir).join("lts.conf");
    assert!(
        mounts.contains(&("lts.conf", lts_conf.to_str().unwrap())),
        "{mounts:?}"
    );
    assert_eq!(
        pod["volumes"][0]["configMap"]["name"].as_str(),
        gen["name"].as_str()
    );

    // Every replica mounts the one shared store of versions where the server keeps them:
    // a rollout strands no node.
    let versions_dir = cfg.nbd.versions_dir.clone().expect("[nbd] versions_dir");
    let mount = c["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == versions_dir.to_str())
        .expect("a volume at versions_dir");
    let vol = pod["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let claim = vol["persistentVolumeClaim"]["claimName"].as_str().unwrap();
    let pvc = yaml("deploy/kubernetes/versions-pvc.yaml");
    assert_eq!(pvc["metadata"]["name"].as_str(), Some(claim));
    assert_eq!(
        pvc["spec"]["accessModes"][0].as_str(),
        Some("ReadWriteMany")
    );
    assert!(resources.contains(&"versions-pvc.yaml"));

    let pdb = yaml("deploy/kubernetes/poddisruptionbudget.yaml");
    assert_eq!(pdb["spec"]["minAvailable"].as_i64(), Some(1));
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
}

#[test]
fn the_nodes_lts_conf_in_the_manifests_is_clean() {
    let text = read("deploy/kubernetes/lts.conf");
    let f = ltsp_common::ltsconf::parse("lts.conf", &text);
    assert!(f.errors.is_empty(), "{:?}", f.errors);
    assert_eq!(f.sections.len(), 1);
}
