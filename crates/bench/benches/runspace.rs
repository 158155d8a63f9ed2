//! Runspace benchmark: round trip of a small command and throughput of a large output, each next to a
//! baseline measured in the same run (the same cmdlet timed inside the same pwsh, without the bridge).
//!
//! `cargo bench --bench runspace` (full: 2,000 calls, 50,000 mailboxes);
//! `PSBRIDGE_BENCH_QUICK=1 cargo bench --bench runspace` (200 calls, 5,000 mailboxes).
//! Uses the simulated ExchangeOnlineManagement module in scripts/sim with EXO_SIM_LATENCY_MS=0, so the
//! numbers are the bridge's own cost.

use std::path::Path;
use std::time::{Duration, Instant};

use psbridge::{Command, Runspace, StreamItem};

use psbridge_bench::{sim_modules, sim_workers};

struct Sizes {
    calls: usize,
    mailboxes: usize,
}

async fn open(tenant: &Path) -> Runspace {
    sim_workers(tenant, 0).open().await.expect("the simulated runspace opens")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs a baseline script and returns its numeric outputs.
async fn numbers(runspace: &mut Runspace, command: Command) -> Vec<f64> {
    let result = runspace.invoke(&command).await.expect("baseline runs");
    assert!(!result.had_errors, "{:?}", result.errors);
    result.output.iter().map(|o| o.value.as_f64().expect("a number")).collect()
}

/// One-shot start-up as scripts do it: a new pwsh that imports the module and connects, per call.
fn one_shot_start(tenant: &Path) -> Duration {
    let pwsh = psbridge::find_pwsh(None).expect("pwsh");
    let started = Instant::now();
    let status = std::process::Command::new(pwsh)
        .args(["-NoLogo", "-NoProfile", "-NonInteractive", "-Command"])
        .arg(
            "Import-Module ExchangeOnlineManagement; \
             Connect-ExchangeOnline -ManagedIdentity -Organization contoso.onmicrosoft.com -ShowBanner:$false; \
             $null = Get-Mailbox -Identity ContosoUser1",
        )
        .env("PSModulePath", sim_modules())
        .env("EXO_SIM_TENANT", tenant)
        .status()
        .expect("pwsh runs");
    assert!(status.success());
    started.elapsed()
}

async fn small_commands(sizes: &Sizes, tenant: &Path) {
    let started = Instant::now();
    let mut runspace = open(tenant).await;
    let open_time = started.elapsed();
    let one_shot = one_shot_start(tenant);
    println!("start-up: Runspace::open (spawn, handshake, import, connect) {:.0} ms", open_time.as_secs_f64() * 1e3);
    println!(
        "          one-shot pwsh (import, connect, one Get-Mailbox)  {:.0} ms  (ratio open/one-shot {:.2})",
        one_shot.as_secs_f64() * 1e3,
        open_time.as_secs_f64() / one_shot.as_secs_f64()
    );

    let get = |i: usize| Command::new("Get-Mailbox").param("Identity", format!("ContosoUser{}", i % 200 + 1));
    for i in 0..50 {
        runspace.invoke(&get(i)).await.unwrap();
    }
    let mut times = Vec::with_capacity(sizes.calls);
    for i in 0..sizes.calls {
        let t = Instant::now();
        let r = runspace.invoke(&get(i * 7)).await.unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(r.output.len(), 1);
    }
    times.sort_by(f64::total_cmp);
    // Baseline: the same calls timed inside the same worker, no bridge in between.
    let inside = numbers(
        &mut runspace,
        Command::script(
            "param($n) $t = [Collections.Generic.List[double]]::new()
             foreach ($i in 0..($n - 1)) { $id = 'ContosoUser' + (($i * 7) % 200 + 1)
               $sw = [Diagnostics.Stopwatch]::StartNew(); $null = Get-Mailbox -Identity $id; $sw.Stop()
               $t.Add($sw.Elapsed.TotalMilliseconds) }
             $t.Sort(); @($t[[int](($n - 1) * 0.5)], $t[[int](($n - 1) * 0.9)], $t[[int](($n - 1) * 0.99)])",
        )
        .param("n", sizes.calls),
    )
    .await;
    println!("\nsmall: {} x Get-Mailbox -Identity (EXO_SIM_LATENCY_MS=0), sequential, warm runspace", sizes.calls);
    println!("  {:<28} {:>9} {:>9} {:>9}", "", "p50 ms", "p90 ms", "p99 ms");
    let bridge = [percentile(&times, 0.5), percentile(&times, 0.9), percentile(&times, 0.99)];
    println!("  {:<28} {:>9.3} {:>9.3} {:>9.3}", "psbridge round trip", bridge[0], bridge[1], bridge[2]);
    println!("  {:<28} {:>9.3} {:>9.3} {:>9.3}", "same cmdlet inside pwsh", inside[0], inside[1], inside[2]);
    println!(
        "  ratio p50 {:.2}; bridge overhead per call at p50 {:.3} ms; {:.0} commands/s",
        bridge[0] / inside[0],
        bridge[0] - inside[0],
        1e3 / bridge[0]
    );
    runspace.close().await.unwrap();
}

async fn large_output(sizes: &Sizes) {
    let tenant = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let status = std::process::Command::new(psbridge::find_pwsh(None).unwrap())
        .args(["-NoLogo", "-NoProfile", "-NonInteractive", "-File"])
        .arg(sim_modules().join("New-SimTenant.ps1"))
        .arg("-Path")
        .arg(tenant.path())
        .arg("-Mailboxes")
        .arg(sizes.mailboxes.to_string())
        .stdout(std::process::Stdio::null())
        .status()
        .expect("New-SimTenant.ps1 runs");
    assert!(status.success());
    println!("\nlarge: tenant of {} mailboxes generated in {:.1} s", sizes.mailboxes, started.elapsed().as_secs_f64());
    let mut runspace = open(tenant.path()).await;
    let all = Command::new("Get-Mailbox").param("ResultSize", "Unlimited");
    runspace.invoke(&Command::new("Get-Mailbox").param("ResultSize", 100)).await.unwrap();

    let started = Instant::now();
    let mut stream = runspace.invoke_stream(&all).unwrap();
    let mut count = 0usize;
    let mut properties = 0usize;
    while let Some(item) = stream.next_item().await.unwrap() {
        if let StreamItem::Output(mailbox) = item {
            count += 1;
            properties += mailbox.value.as_object().map_or(0, |o| o.len());
            assert!(mailbox.value["PrimarySmtpAddress"].is_string());
        }
    }
    let bridge_secs = started.elapsed().as_secs_f64();
    drop(stream);
    assert_eq!(count, sizes.mailboxes);
    let inside_secs = numbers(
        &mut runspace,
        Command::script("(Measure-Command { Get-Mailbox -ResultSize Unlimited | Out-Null }).TotalSeconds"),
    )
    .await[0];
    let json_secs = numbers(
        &mut runspace,
        Command::script(
            "(Measure-Command { Get-Mailbox -ResultSize Unlimited | ForEach-Object { $null = ConvertTo-Json -InputObject $_ -Compress -Depth 4 } }).TotalSeconds",
        ),
    )
    .await[0];
    let per_second = |secs: f64| count as f64 / secs;
    println!("  {count} objects, {} properties each on average", properties / count.max(1));
    println!("  {:<50} {:>10.0} objects/s", "psbridge: streamed to Rust, parsed, every property readable", per_second(bridge_secs));
    println!("  {:<50} {:>10.0} objects/s", "inside pwsh: Get-Mailbox | Out-Null", per_second(inside_secs));
    println!("  {:<50} {:>10.0} objects/s", "inside pwsh: Get-Mailbox | ConvertTo-Json each", per_second(json_secs));
    println!(
        "  ratio psbridge / cmdlet alone {:.2}; psbridge / ConvertTo-Json in pwsh {:.2}",
        inside_secs / bridge_secs,
        json_secs / bridge_secs
    );
    runspace.close().await.unwrap();
}

fn main() {
    let quick = std::env::var_os("PSBRIDGE_BENCH_QUICK").is_some();
    let sizes = if quick { Sizes { calls: 200, mailboxes: 5_000 } } else { Sizes { calls: 2_000, mailboxes: 50_000 } };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let tenant = tempfile::tempdir().unwrap();
        small_commands(&sizes, tenant.path()).await;
        large_output(&sizes).await;
    });
}
