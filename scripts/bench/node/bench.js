// The node-powershell comparator: node-powershell's persistent shell (`pwsh -NoLogo -NoExit -Command -`,
// commands written to its stdin, output read back between delimiters), each command asked to return
// JSON (ConvertTo-Json) so that it delivers structured data like the others.
//
//   node bench.js single   <config.json> <out.json>   1 shell: start-up, warm-up, small sequential
//   node bench.js parallel <config.json> <out.json>   3 shells: start-up, warm-ups, small x3, write x3
//   node bench.js large    <config.json> <out.json>   1 shell: Get-Mailbox -ResultSize Unlimited
//
// The module and tenant come from the environment (PSModulePath, EXO_SIM_TENANT), set by bench.sh.
'use strict';
const fs = require('fs');
const { PowerShell } = require('node-powershell');

const COMPARATOR = 'node-powershell';
const CONNECT = 'Import-Module ExchangeOnlineManagement; ' +
  'Connect-ExchangeOnline -ManagedIdentity -Organization contoso.onmicrosoft.com -ShowBanner:$false';

/** A new shell, connected. */
async function openShell() {
  // TERM=dumb: otherwise pwsh's console host wraps every command's output in cursor-mode escape
  // sequences (ESC[?1h ESC[?1l), which end up in the JSON text.
  const shell = new PowerShell({
    executableOptions: { '-NoProfile': true },
    spawnOptions: { env: { ...process.env, TERM: 'dumb' } },
  });
  await shell.invoke(CONNECT);
  return shell;
}

/** Runs a command and returns its output objects, parsed and every property read. */
async function objects(shell, command) {
  const result = await shell.invoke(`${command} | ConvertTo-Json -Depth 4 -Compress -AsArray`);
  const parsed = result.raw === '' ? [] : JSON.parse(result.raw);
  let properties = 0;
  for (const o of parsed) {
    for (const key of Object.keys(o)) {
      if (o[key] !== null) properties++;
    }
  }
  return { count: parsed.length, properties };
}

async function getMailbox(shell, identity) {
  const { count } = await objects(shell, PowerShell.command`Get-Mailbox -Identity ${identity}`);
  if (count !== 1) throw new Error(`Get-Mailbox ${identity}: ${count} objects`);
}

/** Runs `count` calls in `lanes` concurrent loops, each taking the next index; latencies in ms. */
async function lanes(laneCount, count, call) {
  const latencies = new Array(count);
  let next = 0;
  const start = process.hrtime.bigint();
  await Promise.all(Array.from({ length: laneCount }, async (_, lane) => {
    for (let i = next++; i < count; i = next++) {
      const t = process.hrtime.bigint();
      await call(i, lane);
      latencies[i] = Number(process.hrtime.bigint() - t) / 1e6;
    }
  }));
  return { latencies, seconds: Number(process.hrtime.bigint() - start) / 1e9 };
}

const warmUp = ({ latencies, seconds }) => ({ calls: latencies.length, first_ms: latencies[0] ?? 0, total_ms: seconds * 1e3 });

function latency({ latencies, seconds }) {
  const sorted = [...latencies].sort((a, b) => a - b);
  const at = (p) => sorted[Math.round((sorted.length - 1) * p)];
  return { calls: sorted.length, p50_ms: at(0.5), p90_ms: at(0.9), p99_ms: at(0.99), per_s: sorted.length / seconds };
}

/** Peak resident memory (VmHWM) of a process, in MB. */
function peakMegabytes(pid) {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  return Number(/^VmHWM:\s+(\d+)/m.exec(status)[1]) / 1024;
}

async function main() {
  const [phase, configPath, outPath] = process.argv.slice(2);
  const config = JSON.parse(fs.readFileSync(configPath, 'utf8'));
  const { identities: ids, counts: { warmup, small, writes } } = config;
  const records = [];
  const record = (variant, workload, figures) => records.push({ comparator: COMPARATOR, variant, workload, figures });
  const millisSince = (t) => Number(process.hrtime.bigint() - t) / 1e6;

  if (phase === 'single') {
    const variant = '1 shell';
    const t = process.hrtime.bigint();
    const shell = await openShell();
    record(variant, 'start-up', { ms: millisSince(t) });
    record(variant, 'warm-up', warmUp(await lanes(1, warmup, (i) => getMailbox(shell, ids[i]))));
    record(variant, 'small', latency(await lanes(1, small, (i) => getMailbox(shell, ids[warmup + i]))));
    await shell.dispose();
  } else if (phase === 'parallel') {
    const variant = '3 shells';
    const t = process.hrtime.bigint();
    const shells = await Promise.all([openShell(), openShell(), openShell()]);
    record(variant, 'start-up-x3', { ms: millisSince(t) });
    record(variant, 'warm-up-x3', warmUp(await lanes(3, warmup, (i, lane) => getMailbox(shells[lane], ids[i]))));
    record(variant, 'small-x3', latency(await lanes(3, small, (i, lane) => getMailbox(shells[lane], ids[warmup + i]))));
    const write = (i, lane) => shells[lane].invoke(
      PowerShell.command`Set-Mailbox -Identity ${ids[i % ids.length]} -CustomAttribute1 ${`bench ${config.run_id} node ${i}`}`);
    record(variant, 'warm-up-write-x3', warmUp(await lanes(3, warmup, write)));
    record(variant, 'write-x3', latency(await lanes(3, writes, (i, lane) => write(warmup + i, lane))));
    await Promise.all(shells.map((s) => s.dispose()));
  } else if (phase === 'large') {
    const shell = await openShell();
    const workerPid = Number((await shell.invoke('$PID')).raw);
    // The first full listing is the warm-up (JIT, PowerShell compiling the module's loop), reported apart.
    const warm = process.hrtime.bigint();
    await objects(shell, 'Get-Mailbox -ResultSize Unlimited');
    record('1 shell', 'warm-up-large', { seconds: millisSince(warm) / 1e3 });
    const t = process.hrtime.bigint();
    const { count, properties } = await objects(shell, 'Get-Mailbox -ResultSize Unlimited');
    const seconds = millisSince(t) / 1e3;
    record('1 shell', 'large', {
      objects: count, properties, seconds, per_s: count / seconds,
      caller_peak_mb: process.resourceUsage().maxRSS / 1024, worker_peak_mb: peakMegabytes(workerPid),
    });
    await shell.dispose();
  } else {
    throw new Error(`unknown phase ${phase}`);
  }
  fs.writeFileSync(outPath, JSON.stringify(records, null, 2));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
