//! Pods for real, straight against containerd 1.6 + runc 1.1 (no pullgate): the test bed that
//! create-time tests build on. A busybox image (Debian `busybox-static`) pushed to a real
//! registry is both the CRI plugin's sandbox (pause) image and the app image.

mod common;

use std::fs;
use std::time::Duration;

use common::*;
use k8s_cri::v1::{ContainerFilter, ContainerState, PodSandboxState};
use tonic::Code;

const RUNNING_TIMEOUT: Duration = Duration::from_secs(10);

/// What a process runs, from `/proc/PID/cmdline` (NULs as spaces).
fn cmdline(pid: u32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        String::from_utf8_lossy(&raw)
            .trim_end_matches('\0')
            .replace('\0', " "),
    )
}

/// Waits (≤ 5 s) until `pid` no longer runs `/bin/sleep infinity` (gone, a zombie, or reused).
async fn wait_not_sleeping(pid: u32) -> bool {
    for _ in 0..100 {
        if cmdline(pid).as_deref() != Some(SLEEP) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

const SLEEP: &str = "/bin/sleep infinity";

#[tokio::test(flavor = "multi_thread")]
async fn busybox_pod_runs_on_containerd_and_is_removed() {
    let reg = Registry::start().await;
    let pause = reg.push_busybox("pause", "v1").await;
    let app = reg.push_busybox("app", "v1").await;
    let app_ref = reg.tag_ref("app", "v1");
    let ctd = Containerd::start_with(
        ContainerdOptions::default().sandbox_image(reg.tag_ref("pause", "v1")),
    )
    .await;
    let sock = ctd.socket();
    let log = || format!("--- containerd.log\n{}", ctd.log());

    // kubelet pulls the app image, then sends its image ID to CreateContainer.
    let image_id = pull(&sock, &app_ref, Some("prod"), "web-0")
        .await
        .unwrap_or_else(|e| panic!("PullImage {app_ref}: {e}\n{}", log()));
    assert_eq!(image_id, app.image_id());

    let pod = PodSandbox::run(&sock, "web-0", "prod", "uid-web-0")
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", log()));
    // containerd pulled the sandbox image itself, from the test registry.
    assert!(
        ctd.image_names()
            .await
            .contains(&reg.tag_ref("pause", "v1")),
        "{:?}",
        ctd.image_names().await
    );
    assert_eq!(pause.image_id(), app.image_id(), "one image, two names");
    let sandbox = pod_sandbox_status(&sock, &pod.id).await.expect("status");
    assert_eq!(sandbox.state, PodSandboxState::SandboxReady as i32);
    assert_eq!(
        sandbox.metadata.as_ref().map(|m| m.namespace.as_str()),
        Some("prod")
    );

    let id = pod
        .create_container("app", &image_id, &app_ref)
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", log()));
    let created = container_status(&sock, &id).await.expect("status");
    assert_eq!(created.state, ContainerState::ContainerCreated as i32);
    start_container(&sock, &id)
        .await
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", log()));
    let running = wait_container_state(
        &sock,
        &id,
        ContainerState::ContainerRunning,
        RUNNING_TIMEOUT,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", log()));
    // containerd 1.6 reports the image by a tag it knows and by `repo@digest`; it leaves
    // `image_id` and `image.user_specified_image` empty.
    assert!(
        running.image_ref.ends_with(&format!("/app@{}", app.digest)),
        "{running:?}"
    );
    assert_eq!(
        running.metadata.as_ref().map(|m| m.name.as_str()),
        Some("app")
    );

    // The container's process is really `sleep infinity` from the image's entrypoint, and so
    // is the sandbox's.
    for task in [&pod.id, &id] {
        let pid = ctd
            .task_pid(task)
            .unwrap_or_else(|| panic!("no init.pid for task {task}"));
        assert_eq!(cmdline(pid).as_deref(), Some(SLEEP), "pid {pid}");
    }
    let in_pod = list_containers(
        &sock,
        Some(ContainerFilter {
            pod_sandbox_id: pod.id.clone(),
            ..Default::default()
        }),
    )
    .await
    .expect("ListContainers");
    assert_eq!(
        in_pod
            .iter()
            .map(|c| (c.id.as_str(), c.state))
            .collect::<Vec<_>>(),
        vec![(id.as_str(), ContainerState::ContainerRunning as i32)]
    );

    let app_pid = ctd.task_pid(&id).expect("app pid");
    stop_container(&sock, &id, 0).await.expect("StopContainer");
    let exited = container_status(&sock, &id).await.expect("status");
    assert_eq!(exited.state, ContainerState::ContainerExited as i32);
    assert!(
        wait_not_sleeping(app_pid).await,
        "sleep {app_pid} still runs"
    );
    remove_container(&sock, &id).await.expect("RemoveContainer");
    assert_eq!(
        container_status(&sock, &id)
            .await
            .map_err(|e| e.code())
            .err(),
        Some(Code::NotFound)
    );

    let pod_id = pod.id.clone();
    pod.remove().await.expect("stop and remove the pod");
    assert!(list_pod_sandboxes(&sock, None)
        .await
        .expect("ListPodSandbox")
        .is_empty());
    assert_eq!(
        pod_sandbox_status(&sock, &pod_id)
            .await
            .map_err(|e| e.code())
            .err(),
        Some(Code::NotFound)
    );
    assert!(ctd.task_ids().is_empty(), "{:?}", ctd.task_ids());
}

/// A pod left running when the test ends (a panicking test) is cleaned up: the sandbox guard
/// removes it through the CRI, and containerd's drop kills any task left.
#[tokio::test(flavor = "multi_thread")]
async fn dropped_pod_and_containerd_leave_no_process() {
    let reg = Registry::start().await;
    let image = reg.push_busybox("pause", "v1").await;
    let ctd = Containerd::start_with(
        ContainerdOptions::default().sandbox_image(reg.tag_ref("pause", "v1")),
    )
    .await;
    let sock = ctd.socket();

    // Dropped without remove(): the guard stops and removes it.
    let pod = PodSandbox::run(&sock, "a", "dev", "uid-a")
        .await
        .expect("RunPodSandbox a");
    let pod_pid = ctd.task_pid(&pod.id).expect("sandbox pid");
    drop(pod);
    assert!(
        wait_not_sleeping(pod_pid).await,
        "sandbox {pod_pid} still runs"
    );
    assert!(list_pod_sandboxes(&sock, None)
        .await
        .expect("list")
        .is_empty());

    // A running container whose pod guard is forgotten: containerd's drop kills it.
    let pod = PodSandbox::run(&sock, "b", "dev", "uid-b")
        .await
        .expect("RunPodSandbox b");
    let id = pod
        .create_container("app", image.image_id(), &reg.tag_ref("pause", "v1"))
        .await
        .expect("CreateContainer");
    start_container(&sock, &id).await.expect("StartContainer");
    let pids = [
        ctd.task_pid(&pod.id).expect("sandbox pid"),
        ctd.task_pid(&id).expect("app pid"),
    ];
    for pid in pids {
        assert_eq!(cmdline(pid).as_deref(), Some(SLEEP), "pid {pid}");
    }
    let _ = pod.into_id();
    drop(ctd);
    for pid in pids {
        assert!(
            wait_not_sleeping(pid).await,
            "{pid} still runs after containerd's drop"
        );
    }
}

/// What containerd itself answers when `CreateContainer` names an image it does not have (the
/// baseline a proxy's refusals are compared with), and that the sandbox survives it.
#[tokio::test(flavor = "multi_thread")]
async fn create_container_with_an_image_containerd_lacks_is_not_found() {
    let reg = Registry::start().await;
    let image = reg.push_busybox("pause", "v1").await;
    // Same layer, another config: an image ID containerd never saw.
    let other = TestImage::busybox_with_config(|c| c["config"]["Env"] = serde_json::json!(["X=1"]));
    assert_ne!(other.image_id(), image.image_id());
    let ctd = Containerd::start_with(
        ContainerdOptions::default().sandbox_image(reg.tag_ref("pause", "v1")),
    )
    .await;
    let sock = ctd.socket();
    let pod = PodSandbox::run(&sock, "web-0", "prod", "uid-web-0")
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctd.log()));

    let err = pod
        .create_container("app", other.image_id(), &reg.tag_ref("app", "v2"))
        .await
        .expect_err("CreateContainer of an unknown image ID");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains(other.image_id()), "{err:?}");
    assert!(list_containers(&sock, None).await.expect("list").is_empty());

    // The sandbox image is known (containerd pulled it), so its ID works as an app image.
    let id = pod
        .create_container("app", image.image_id(), &reg.tag_ref("pause", "v1"))
        .await
        .expect("CreateContainer of the sandbox image");
    start_container(&sock, &id).await.expect("StartContainer");
    wait_container_state(
        &sock,
        &id,
        ContainerState::ContainerRunning,
        RUNNING_TIMEOUT,
    )
    .await
    .expect("running");
    pod.remove().await.expect("remove pod");
    assert!(ctd.task_ids().is_empty(), "{:?}", ctd.task_ids());
}

/// The same helpers work through `pullgate serve`'s socket: a pod in a namespace no policy
/// enforces runs through it, every RuntimeService call forwarded to containerd.
#[tokio::test(flavor = "multi_thread")]
async fn pod_lifecycle_through_pullgate_in_an_unenforced_namespace() {
    let reg = Registry::start().await;
    let image = reg.push_busybox("pause", "v1").await;
    let ctd = Containerd::start_with(
        ContainerdOptions::default().sandbox_image(reg.tag_ref("pause", "v1")),
    )
    .await;
    let policy = write_policy_dir(&[]);
    let pg = Pullgate::start(&ctd.socket(), policy.path(), &[]).await;
    let sock = pg.socket();
    let log = || {
        format!(
            "--- pullgate\n{}\n--- containerd.log\n{}",
            pg.log(),
            ctd.log()
        )
    };

    let pod = PodSandbox::run(&sock, "web-0", "dev", "uid-web-0")
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox via pullgate: {e}\n{}", log()));
    let id = pod
        .create_container("app", image.image_id(), &reg.tag_ref("pause", "v1"))
        .await
        .unwrap_or_else(|e| panic!("CreateContainer via pullgate: {e}\n{}", log()));
    start_container(&sock, &id)
        .await
        .unwrap_or_else(|e| panic!("StartContainer via pullgate: {e}\n{}", log()));
    // Both sockets see the same running container.
    for s in [&sock, &ctd.socket()] {
        let status = container_status(s, &id).await.expect("ContainerStatus");
        assert_eq!(status.state, ContainerState::ContainerRunning as i32);
    }
    let pid = ctd.task_pid(&id).expect("app pid");
    assert_eq!(cmdline(pid).as_deref(), Some(SLEEP));
    pod.remove().await.expect("remove pod via pullgate");
    assert!(wait_not_sleeping(pid).await);
    assert!(list_pod_sandboxes(&ctd.socket(), None)
        .await
        .expect("list")
        .is_empty());
}
