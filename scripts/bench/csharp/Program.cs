// The in-process C# comparator: PowerShell 7.6.9 hosted in this process (Microsoft.PowerShell.SDK),
// written as Samples 1 and 2 of Microsoft's "Use C# to connect to Exchange Online PowerShell". No
// process boundary and no serialization: the floor the other comparators are measured against.
//
//   PsBench single   <config.json> <out.json>   Sample 1: start-up, warm-up, small sequential
//   PsBench parallel <config.json> <out.json>   Sample 2: start-up, warm-ups, small x3, write x3, peak memory
//   PsBench large    <config.json> <out.json>   Sample 1: Get-Mailbox -ResultSize Unlimited
//
// The module and tenant come from the environment (PSModulePath, EXO_SIM_TENANT), set by bench.sh.
using System.Collections.ObjectModel;
using System.Diagnostics;
using System.Management.Automation;
using System.Management.Automation.Runspaces;
using System.Text.Json;
using System.Text.Json.Nodes;

const string Comparator = "in-process C#";
var (phase, configPath, outPath) = (args[0], args[1], args[2]);
var config = JsonNode.Parse(File.ReadAllText(configPath))!;
var ids = config["identities"]!.AsArray().Select(n => (string)n!).ToArray();
var counts = config["counts"]!;
int warmup = (int)counts["warmup"]!, small = (int)counts["small"]!, writes = (int)counts["writes"]!;
var records = new List<object>();
void Record(string variant, string workload, object figures) =>
    records.Add(new { comparator = Comparator, variant, workload, figures });

switch (phase)
{
    case "single":
    {
        const string variant = "Runspace (Sample 1)";
        var clock = Stopwatch.StartNew();
        using var runspace = Sample1.Open();
        Record(variant, "start-up", new { ms = clock.Elapsed.TotalMilliseconds });
        var warm = Bench.Lanes(1, warmup, i => Sample1.GetMailbox(runspace, ids[i]));
        Record(variant, "warm-up", Bench.WarmUp(warm));
        var run = Bench.Lanes(1, small, i => Sample1.GetMailbox(runspace, ids[warmup + i]));
        Record(variant, "small", Bench.Latency(run));
        break;
    }
    case "parallel":
    {
        const string variant = "RunspacePool x3 (Sample 2)";
        var clock = Stopwatch.StartNew();
        using var pool = Sample2.Open();
        Record(variant, "start-up-x3", new { ms = clock.Elapsed.TotalMilliseconds });
        var warm = Bench.Lanes(3, warmup, i => Sample2.Invoke(pool, "Get-Mailbox", ("Identity", ids[i])));
        Record(variant, "warm-up-x3", Bench.WarmUp(warm));
        var run = Bench.Lanes(3, small, i => Sample2.Invoke(pool, "Get-Mailbox", ("Identity", ids[warmup + i])));
        Record(variant, "small-x3", Bench.Latency(run));
        var runId = (string)config["run_id"]!;
        void Write(int i) => Sample2.Invoke(pool, "Set-Mailbox",
            ("Identity", ids[i % ids.Length]), ("CustomAttribute1", $"bench {runId} csharp {i}"));
        Record(variant, "warm-up-write-x3", Bench.WarmUp(Bench.Lanes(3, warmup, Write)));
        Record(variant, "write-x3", Bench.Latency(Bench.Lanes(3, writes, i => Write(warmup + i))));
        // One process: the caller is the workers.
        Record(variant, "peak-x3", new { caller_mb = Bench.PeakMegabytes(), workers_mb = (double?)null, total_mb = Bench.PeakMegabytes() });
        break;
    }
    case "large":
    {
        using var runspace = Sample1.Open();
        // The first full listing runs far slower (JIT, PowerShell compiling the module's loop): it is
        // the warm-up, reported apart.
        var warm = Stopwatch.StartNew();
        Sample1.ReadAll(Sample1.Invoke(runspace, "Get-Mailbox", ("ResultSize", "Unlimited")));
        Record("Runspace (Sample 1)", "warm-up-large", new { seconds = warm.Elapsed.TotalSeconds });
        var clock = Stopwatch.StartNew();
        var (objects, properties) = Sample1.ReadAll(Sample1.Invoke(runspace, "Get-Mailbox", ("ResultSize", "Unlimited")));
        var seconds = clock.Elapsed.TotalSeconds;
        // Invoke() returns the whole result, as in Sample 1, so the peak holds every object. One
        // process: the caller is the worker.
        Record("Runspace (Sample 1)", "large", new
        {
            objects, properties, seconds, per_s = objects / seconds,
            caller_peak_mb = Bench.PeakMegabytes(), worker_peak_mb = (double?)null,
        });
        break;
    }
    default:
        throw new ArgumentException($"unknown phase {phase}");
}
File.WriteAllText(outPath, JsonSerializer.Serialize(records, new JsonSerializerOptions { WriteIndented = true }));

/// Sample 1: an InitialSessionState that imports the module, one runspace, Connect, then cmdlets.
static class Sample1
{
    public static InitialSessionState SessionState()
    {
        var iss = InitialSessionState.CreateDefault();
        if (OperatingSystem.IsWindows()) iss.ExecutionPolicy = Microsoft.PowerShell.ExecutionPolicy.RemoteSigned;
        iss.ImportPSModule(["ExchangeOnlineManagement"]);
        iss.ThrowOnRunspaceOpenError = true;
        return iss;
    }

    public static Runspace Open()
    {
        var runspace = RunspaceFactory.CreateRunspace(SessionState());
        // Sample 1 keeps the default, which for a runspace is a new thread per invocation (about 1.5 ms
        // more per small command here). ReuseThread, as Sample 2 and psbridge's worker use, keeps the
        // floor a floor.
        runspace.ThreadOptions = PSThreadOptions.ReuseThread;
        runspace.Open();
        Invoke(runspace, "Connect-ExchangeOnline",
            ("ManagedIdentity", true), ("Organization", "contoso.onmicrosoft.com"), ("ShowBanner", false));
        return runspace;
    }

    public static Collection<PSObject> Invoke(Runspace runspace, string command, params (string, object)[] parameters)
    {
        using var ps = PowerShell.Create(runspace);
        ps.AddCommand(command);
        foreach (var (name, value) in parameters) ps.AddParameter(name, value);
        var output = ps.Invoke();
        Bench.ThrowOnErrors(ps, command);
        return output;
    }

    public static void GetMailbox(Runspace runspace, string identity)
    {
        var output = Invoke(runspace, "Get-Mailbox", ("Identity", identity));
        if (ReadAll(output).Objects != 1) throw new InvalidOperationException($"Get-Mailbox {identity}: not one object");
    }

    /// Reads every property of every object, as a caller that uses the results would.
    public static (int Objects, long Properties) ReadAll(IEnumerable<PSObject> output)
    {
        int objects = 0;
        long properties = 0;
        foreach (var o in output)
        {
            objects++;
            foreach (var property in o.Properties)
            {
                if (property.Value is not null) properties++;
            }
        }
        return (objects, properties);
    }
}

/// Sample 2: a RunspacePool (min = max = 3, ReuseThread), each runspace connected, BeginInvoke/EndInvoke.
static class Sample2
{
    // Exchange's connection state is per process: connecting a second runspace of the pool replaces the
    // first one's connection, so Sample 2 as written leaves only the last-connected runspace working
    // (the others fail with "You must call Connect-ExchangeOnline ..."; office-docs-powershell #10902).
    // Each runspace therefore connects with its own -Prefix and aliases the plain names to its prefixed
    // commands, so that every runspace works and the workload stays `Get-Mailbox -Identity x`. The
    // connects wait for one another so that each one holds, and so connects, a different runspace.
    const string ConnectScript = """
        param([string] $Prefix, [System.Threading.CountdownEvent] $AllStarted)
        $AllStarted.Signal()
        if (-not $AllStarted.Wait(60000)) { throw 'the pool did not run three connects at once' }
        Connect-ExchangeOnline -ManagedIdentity -Organization contoso.onmicrosoft.com -ShowBanner:$false -Prefix $Prefix
        Set-Alias -Name Get-Mailbox -Value "Get-${Prefix}Mailbox" -Scope Global
        Set-Alias -Name Set-Mailbox -Value "Set-${Prefix}Mailbox" -Scope Global
        """;

    public static RunspacePool Open()
    {
        var pool = RunspaceFactory.CreateRunspacePool(Sample1.SessionState());
        pool.SetMinRunspaces(3);
        pool.SetMaxRunspaces(3);
        pool.ThreadOptions = PSThreadOptions.ReuseThread;
        pool.Open();
        using var allStarted = new CountdownEvent(3);
        var connects = Enumerable.Range(1, 3).Select(n =>
        {
            var ps = PowerShell.Create();
            ps.RunspacePool = pool;
            ps.AddScript(ConnectScript).AddParameter("Prefix", $"Bench{n}").AddParameter("AllStarted", allStarted);
            return (ps, handle: ps.BeginInvoke());
        }).ToList();
        foreach (var (ps, handle) in connects)
        {
            ps.EndInvoke(handle);
            Bench.ThrowOnErrors(ps, "Connect-ExchangeOnline");
            ps.Dispose();
        }
        return pool;
    }

    public static void Invoke(RunspacePool pool, string command, params (string, object)[] parameters)
    {
        using var ps = PowerShell.Create();
        ps.RunspacePool = pool;
        ps.AddCommand(command);
        foreach (var (name, value) in parameters) ps.AddParameter(name, value);
        var handle = ps.BeginInvoke();
        var output = ps.EndInvoke(handle);
        Bench.ThrowOnErrors(ps, command);
        Sample1.ReadAll(output);
    }
}

static class Bench
{
    public static void ThrowOnErrors(PowerShell ps, string command)
    {
        if (ps.HadErrors)
        {
            var errors = string.Join("; ", ps.Streams.Error.Select(e => e.ToString()));
            throw new InvalidOperationException($"{command} reported errors: {errors}");
        }
    }

    /// Runs `count` calls on `lanes` threads, each taking the next index; returns each call's latency
    /// (ms) and the wall time (s).
    public static (double[] Latencies, double Seconds) Lanes(int lanes, int count, Action<int> call)
    {
        var latencies = new double[count];
        int next = -1;
        var clock = Stopwatch.StartNew();
        var threads = Enumerable.Range(0, lanes).Select(_ => new Thread(() =>
        {
            int i;
            while ((i = Interlocked.Increment(ref next)) < count)
            {
                long start = Stopwatch.GetTimestamp();
                call(i);
                latencies[i] = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
            }
        })).ToList();
        threads.ForEach(t => t.Start());
        threads.ForEach(t => t.Join());
        return (latencies, clock.Elapsed.TotalSeconds);
    }

    public static object WarmUp((double[] Latencies, double Seconds) run) =>
        new { calls = run.Latencies.Length, first_ms = run.Latencies.FirstOrDefault(), total_ms = run.Seconds * 1e3 };

    public static object Latency((double[] Latencies, double Seconds) run)
    {
        var sorted = run.Latencies.Order().ToArray();
        double At(double p) => sorted[(int)Math.Round((sorted.Length - 1) * p)];
        return new
        {
            calls = sorted.Length, p50_ms = At(0.5), p90_ms = At(0.9), p99_ms = At(0.99),
            per_s = sorted.Length / run.Seconds,
        };
    }

    /// This process's peak resident memory (VmHWM), in MB.
    public static double PeakMegabytes()
    {
        var line = File.ReadLines("/proc/self/status").First(l => l.StartsWith("VmHWM:"));
        return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) / 1024.0;
    }
}
