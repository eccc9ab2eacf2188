//! virtio-net on a tap, checked from both ends: the probe guest's own driver talks to this
//! host's network stack through a tap vireo creates (each test its own tap and subnet, so
//! tests run in parallel), and the host checks what arrived.

mod common;

use std::net::{Ipv4Addr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A tap vireo creates: host address 10.230.N.1, guest 10.230.N.2.
struct Link {
    tap: String,
    host: Ipv4Addr,
    guest: Ipv4Addr,
}

fn link(n: u8) -> Link {
    Link {
        tap: format!("vtnet{n}"),
        host: Ipv4Addr::new(10, 230, n, 1),
        guest: Ipv4Addr::new(10, 230, n, 2),
    }
}

impl Link {
    fn net_arg(&self, extra: &str) -> String {
        format!(
            "tap={},ip={},mask=255.255.255.0{extra}",
            self.tap, self.host
        )
    }

    fn cmdline(&self, mode: &str, extra: &str) -> String {
        format!(
            "probe.mode={mode} probe.net.ip={} probe.net.host={} {extra}",
            self.guest, self.host
        )
    }
}

fn run(args: Vec<String>) -> Running {
    let elf = probe_elf();
    let mut all = vec!["--kernel".to_string(), elf.display().to_string()];
    all.extend(args);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    spawn(&all)
}

fn net_run(l: &Link, net_extra: &str, mode: &str, cmd_extra: &str) -> Finished {
    run(vec![
        "--net".into(),
        l.net_arg(net_extra),
        "--cmdline".into(),
        l.cmdline(mode, cmd_extra),
    ])
    .finish(PROBE_TIMEOUT)
}

#[test]
fn the_guest_pings_the_host() {
    if !kvm_available("the_guest_pings_the_host") {
        return;
    }
    let l = link(1);
    let r = net_run(&l, "", "net-ping", "probe.net.count=3");
    r.assert_probe_ok();
    assert_eq!(
        r.field("probe: net ping sent", "received").as_deref(),
        Some("3"),
        "{}",
        r.stdout
    );
    assert!(r
        .line("probe: net arp host=")
        .is_some_and(|a| !a.ends_with("timeout")));
}

/// The same ping under KVM's in-kernel irqchip.
#[test]
fn the_guest_pings_the_host_with_the_in_kernel_irqchip() {
    if !kvm_available("the_guest_pings_the_host_with_the_in_kernel_irqchip") {
        return;
    }
    let l = link(12);
    let r = run(vec![
        "--platform".into(),
        "irqchip=kernel".into(),
        "--net".into(),
        l.net_arg(""),
        "--cmdline".into(),
        l.cmdline("net-ping", "probe.net.count=3"),
    ])
    .finish(PROBE_TIMEOUT);
    r.assert_probe_ok();
    assert_eq!(
        r.field("probe: net ping sent", "received").as_deref(),
        Some("3"),
        "{}",
        r.stdout
    );
}

#[test]
fn the_mac_given_on_the_command_line_is_the_guests() {
    if !kvm_available("the_mac_given_on_the_command_line_is_the_guests") {
        return;
    }
    let l = link(2);
    let r = net_run(
        &l,
        ",mac=02:aa:bb:cc:dd:ee",
        "net-ping",
        "probe.net.count=1",
    );
    r.assert_probe_ok();
    assert_eq!(
        r.field("probe: net dev=0", "mac").as_deref(),
        Some("02:aa:bb:cc:dd:ee")
    );
    assert_eq!(r.field("probe: net dev=0", "link").as_deref(), Some("up"));
}

/// Word-wise FNV-1a over the concatenated payloads, as the probe computes it.
fn payload_sum(payloads: &[Vec<u8>]) -> u64 {
    let all: Vec<u8> = payloads.concat();
    fnv1a64w(&all)
}

#[test]
fn udp_both_ways_with_checksum_offload_and_merged_receive_buffers() {
    if !kvm_available("udp_both_ways_with_checksum_offload_and_merged_receive_buffers") {
        return;
    }
    let l = link(3);
    let count = 16;
    let running = run(vec![
        "--net".into(),
        l.net_arg(""),
        "--cmdline".into(),
        l.cmdline(
            "net-udp",
            &format!("probe.net.count={count} probe.net.size=1400 probe.net.port=5003"),
        ),
    ]);
    // The tap exists once vireo runs; echo every datagram back.
    let sock = bind_when_ready(l.host, 5003);
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let got: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let (got, stop) = (got.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    got.lock().unwrap().push(buf[..n].to_vec());
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        })
    };
    let r = running.finish(PROBE_TIMEOUT);
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();
    r.assert_probe_ok();
    let line = r.line("probe: net udp").unwrap_or("").to_string();
    assert_eq!(field(&line, "sent").as_deref(), Some("16"), "{line}");
    assert_eq!(field(&line, "received").as_deref(), Some("16"), "{line}");
    let host_sum = format!("{:#018x}", payload_sum(&got.lock().unwrap()));
    assert_eq!(field(&line, "sum_sent"), Some(host_sum.clone()), "{line}");
    assert_eq!(field(&line, "sum_received"), Some(host_sum), "{line}");
    assert_eq!(field(&line, "csum_offload").as_deref(), Some("1"), "{line}");
    assert_eq!(field(&line, "rx_bad_csum").as_deref(), Some("0"), "{line}");
    let multi: u32 = field(&line, "rx_multi_buffer")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        multi > 0,
        "no frame spanned several receive buffers: {line}"
    );
}

#[test]
fn control_queue_changes_the_mac_and_the_receive_filter() {
    if !kvm_available("control_queue_changes_the_mac_and_the_receive_filter") {
        return;
    }
    let l = link(4);
    let r = net_run(
        &l,
        "",
        "net-ctrl",
        "probe.net.mac=02:11:22:33:44:55 probe.net.count=2",
    );
    r.assert_probe_ok();
    let line = r.line("probe: net ctrl").unwrap_or("").to_string();
    for key in [
        "mac-addr-set",
        "promisc-off",
        "promisc-on",
        "allmulti-on",
        "allmulti-off",
    ] {
        assert_eq!(field(&line, key).as_deref(), Some("ok"), "{key}: {line}");
    }
    // With the filter on and the new MAC set, the host's replies still reach the guest.
    assert_eq!(
        r.field("probe: net ping sent", "received").as_deref(),
        Some("2"),
        "{}",
        r.stdout
    );
}

#[test]
fn hostile_frames_and_commands_leave_the_device_working() {
    if !kvm_available("hostile_frames_and_commands_leave_the_device_working") {
        return;
    }
    let l = link(5);
    let r = net_run(&l, "", "net-hostile", "probe.net.count=2");
    r.assert_probe_ok();
    for case in [
        "tx-short-header",
        "tx-header-writable",
        "tx-addr-outside-ram",
        "tx-too-long",
    ] {
        let line = r
            .lines_with("probe: net-hostile case=")
            .into_iter()
            .find(|x| field(x, "case").as_deref() == Some(case))
            .unwrap_or_else(|| panic!("no case {case}:\n{}", r.stdout))
            .to_string();
        assert_eq!(field(&line, "completed").as_deref(), Some("yes"), "{line}");
    }
    for case in ["ctrl-bad-length", "ctrl-unknown-class"] {
        let line = r
            .lines_with("probe: net-hostile case=")
            .into_iter()
            .find(|x| field(x, "case").as_deref() == Some(case))
            .unwrap_or_else(|| panic!("no case {case}:\n{}", r.stdout))
            .to_string();
        assert_eq!(field(&line, "ack").as_deref(), Some("err"), "{line}");
    }
    assert_eq!(
        r.field("probe: net-hostile recovery", "recovery")
            .as_deref(),
        Some("ok")
    );
}

#[test]
fn two_nics_at_once() {
    if !kvm_available("two_nics_at_once") {
        return;
    }
    let (a, b) = (link(6), link(7));
    let r = run(vec![
        "--net".into(),
        a.net_arg(""),
        "--net".into(),
        b.net_arg(""),
        "--cmdline".into(),
        // The second NIC, on the second tap's subnet.
        b.cmdline("net-ping", "probe.net.count=2 probe.net.dev=1"),
    ])
    .finish(PROBE_TIMEOUT);
    r.assert_probe_ok();
    let nics = r
        .lines_with("probe: virtio device ")
        .iter()
        .filter(|l| l.ends_with("id=1"))
        .count();
    assert_eq!(nics, 2, "{}", r.stdout);
    assert!(r.line("probe: net dev=1").is_some(), "{}", r.stdout);
    assert_eq!(
        r.field("probe: net ping sent", "received").as_deref(),
        Some("2")
    );
}

/// CPU nanoseconds used by vireo's threads other than its vCPUs (schedstat).
fn vmm_cpu_ns(pid: i32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter(|t| {
            !std::fs::read_to_string(t.path().join("comm"))
                .unwrap_or_default()
                .starts_with("vcpu")
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Binds a UDP socket on the host side of a tap vireo is still creating.
fn bind_when_ready(host: Ipv4Addr, port: u16) -> UdpSocket {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UdpSocket::bind((host, port)) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("cannot bind {host}:{port}: {e}"),
        }
    }
}

fn udp_sender(host: Ipv4Addr) -> UdpSocket {
    bind_when_ready(host, 0)
}

/// While the guest reads nothing, a flood fills its buffers: vireo must then stop
/// reading the tap rather than spin (a generous bound: under 5% of a core over 2 s).
#[test]
fn a_flood_without_receive_buffers_does_not_make_vireo_spin() {
    if !kvm_available("a_flood_without_receive_buffers_does_not_make_vireo_spin") {
        return;
    }
    let l = link(8);
    let running = run(vec![
        "--net".into(),
        l.net_arg(""),
        "--cmdline".into(),
        l.cmdline("net-idle", "probe.net.wait=4000 probe.net.count=1"),
    ]);
    assert!(
        running
            .wait_for_line(PROBE_TIMEOUT, |x| x == "probe: net-idle start")
            .is_some(),
        "the guest never went idle"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let (stop, sock, guest) = (stop.clone(), udp_sender(l.host), l.guest);
        std::thread::spawn(move || {
            let payload = [0x33u8; 1000];
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..32 {
                    let _ = sock.send_to(&payload, (guest, 4000));
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let before = vmm_cpu_ns(running.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = vmm_cpu_ns(running.pid()) - before;
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    let r = running.finish(PROBE_TIMEOUT);
    r.assert_probe_ok();
    assert!(
        used < 100_000_000,
        "vireo used {} ms of CPU in 2 s while the guest posted no buffers",
        used / 1_000_000
    );
    assert!(
        buffer_waits(&r.stderr) > 0,
        "the guest's buffers never ran out: {}",
        r.stderr
    );
}

/// The "N waits for buffers" count from vireo's exit report.
fn buffer_waits(stderr: &str) -> u64 {
    stderr
        .split(" waits for buffers")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Frames that arrive while the guest's buffers are full are held (the one vireo read
/// waits in vireo, the rest in the tap's queue) and all delivered once buffers come back.
#[test]
fn nothing_is_dropped_by_vireo_while_the_guest_has_no_buffers() {
    if !kvm_available("nothing_is_dropped_by_vireo_while_the_guest_has_no_buffers") {
        return;
    }
    let l = link(9);
    let sent = 300;
    let running = run(vec![
        "--net".into(),
        l.net_arg(""),
        "--cmdline".into(),
        l.cmdline(
            "net-idle",
            &format!("probe.net.wait=3000 probe.net.count={sent}"),
        ),
    ]);
    assert!(
        running
            .wait_for_line(PROBE_TIMEOUT, |x| x == "probe: net-idle start")
            .is_some(),
        "the guest never went idle"
    );
    let sock = udp_sender(l.host);
    for i in 0..sent {
        let payload = [i as u8; 1000];
        sock.send_to(&payload, (l.guest, 4000)).unwrap();
        // Paced so the host's own queues never overflow.
        if i % 32 == 31 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let r = running.finish(PROBE_TIMEOUT);
    r.assert_probe_ok();
    assert_eq!(
        r.field("probe: net-idle received", "received"),
        Some(sent.to_string()),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    assert!(
        buffer_waits(&r.stderr) > 0,
        "the guest's buffers never ran out: {}",
        r.stderr
    );
}
