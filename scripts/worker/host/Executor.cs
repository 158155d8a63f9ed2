// psbridge worker host: the session and the requests run in it.

namespace PsBridge
{
    /// <summary>
    /// One runspace of the worker and the requests run in it: builds the session (like InitialSessionState
    /// in Microsoft's C# sample) and runs its requests one at a time, in order, always on the same thread
    /// (runspace 0 on the worker's main thread, the others each on a thread of their own; see Lanes).
    /// </summary>
    public sealed class Executor
    {
        private readonly int index;
        private readonly BlockingCollection<Request> queue = new BlockingCollection<Request>();
        private readonly BridgeHost host;
        private readonly object currentGate = new object();
        private Runspace runspace;
        private Thread thread;
        private PowerShell current;
        private long currentId = -1;
        private bool errorsWritten;
        private int sessionDepth = 4;
        private int? exitCode;
        // Where PowerShell keeps the switch that makes `exit` in a script file end the whole pipeline (as
        // under `pwsh -File`) instead of only that script; null where this PowerShell has no such member.
        private static readonly System.Reflection.PropertyInfo ExecutionContextProperty =
            typeof(Runspace).Assembly.GetType("System.Management.Automation.Runspaces.LocalRunspace")
                ?.GetProperty("ExecutionContext", System.Reflection.BindingFlags.NonPublic | System.Reflection.BindingFlags.Instance);

        public Executor(int index)
        {
            this.index = index;
            host = new BridgeHost(this);
        }

        /// <summary>The id of the request this runspace is running, or -1.</summary>
        public long CurrentId { get { lock (currentGate) return currentId; } }

        /// <summary>Called by the host when the running script calls `exit N`: the request ends with that code.</summary>
        public void NoteExit(int code) => exitCode = code;

        /// <summary>Reports a confirmation the host declined, in the running request's error stream.</summary>
        public void ReportDeclined(string caption, string message)
        {
            long id = CurrentId;
            if (id < 0) return;
            string what = string.IsNullOrEmpty(message) ? caption : caption + ": " + message;
            var exception = new OperationCanceledException(
                "psbridge declined a confirmation it cannot show (" + what + "); nothing was done. " +
                "Pass -Confirm:$false to confirm without a prompt (or -Force where the command has it).");
            var record = new ErrorRecord(exception, "PsBridgeConfirmationDeclined", ErrorCategory.OperationStopped, caption);
            SendError(id, record, false);
            errorsWritten = true;
        }

        public static void SendReady()
        {
            Protocol.Send("ready", null, w =>
            {
                w.WriteNumber("protocol", Protocol.Version);
                w.WriteString("ps_version", PSVersionInfo.PSVersion.ToString());
                w.WriteString("ps_edition", PSVersionInfo.PSEdition);
                w.WriteString("os", RuntimeInformation.OSDescription);
                w.WriteNumber("pid", Environment.ProcessId);
            });
        }

        /// <summary>Queues a request (or the exit marker) behind this runspace's others.</summary>
        public void Enqueue(Request request) => queue.Add(request);

        /// <summary>Runs this runspace's requests on a thread of its own (runspaces other than 0).</summary>
        public void StartThread()
        {
            // The stack PowerShell gives its own pipeline threads: deep scripts recurse far.
            thread = new Thread(Loop, 10_000_000) { IsBackground = true, Name = "psbridge-runspace-" + index };
            thread.Start();
        }

        /// <summary>Waits for a runspace started with StartThread to finish its requests.</summary>
        public void Join() => thread?.Join();

        /// <summary>Runs queued requests, in order, until the exit marker.</summary>
        public void Loop()
        {
            while (true)
            {
                var request = queue.Take();
                if (request.Type == "exit") return;
                Handle(request);
            }
        }

        /// <summary>Handles one request of this runspace.</summary>
        private void Handle(Request request)
        {
            bool cancelled;
            lock (Inbox.CancelGate) cancelled = Inbox.TakeCancelled(request.Id);
            if (cancelled) { SendDone(request.Id, "Stopped", false, 0); return; }
            try
            {
                switch (request.Type)
                {
                    case "setup": Setup(request); break;
                    case "invoke": Invoke(request); break;
                    default:
                        Protocol.Send("fatal", request.Id, w => w.WriteString("message", "unknown request type '" + request.Type + "'"));
                        break;
                }
            }
            catch (Exception e) // a malformed request or a bug here: report it against the request, keep serving
            {
                SendError(request.Id, ToRecord(e, "PsBridgeWorkerError"), true);
                SendDone(request.Id, "Failed", true, 0);
            }
        }

        /// <summary>Answers a request for a runspace that was never set up (from the inbox thread).</summary>
        public static void Refuse(Request request, string why)
        {
            SendError(request.Id, ToRecord(new InvalidOperationException(why), "NotSetUp"), true);
            SendDone(request.Id, "Failed", true, 0);
        }

        /// <summary>Called from the inbox thread under Inbox.CancelGate: stops the running request if it is the one named.</summary>
        public bool StopIfRunning(long id)
        {
            lock (currentGate)
            {
                if (current == null || currentId != id) return false;
                current.BeginStop(null, null); // Stop() has no bound of its own; the owner bounds the wait
                return true;
            }
        }

        public void Close()
        {
            runspace?.Dispose();
        }

        private void Setup(Request request)
        {
            var watch = Stopwatch.StartNew();
            var body = request.Body;
            if (runspace != null) throw new InvalidOperationException("runspace " + index + " is already set up");
            var iss = InitialSessionState.CreateDefault2();
            if (body.TryGetProperty("depth", out var depth)) sessionDepth = depth.GetInt32();
            if (body.TryGetProperty("modules", out var modules))
            {
                foreach (var module in modules.EnumerateArray()) iss.ImportPSModule(new[] { ModuleSpec(module) });
            }
            if (OperatingSystem.IsWindows() && body.TryGetProperty("execution_policy", out var policy) && policy.ValueKind == JsonValueKind.String)
            {
                iss.ExecutionPolicy = Enum.Parse<Microsoft.PowerShell.ExecutionPolicy>(policy.GetString(), true);
            }
            if (body.TryGetProperty("variables", out var variables))
            {
                foreach (var v in variables.EnumerateObject()) iss.Variables.Add(new SessionStateVariableEntry(v.Name, Values.From(v.Value), null));
            }
            iss.ThrowOnRunspaceOpenError = true;
            try
            {
                runspace = RunspaceFactory.CreateRunspace(host, iss);
                // Commands run on this runspace's own thread: always the same thread, so thread-affine
                // module state holds, and no hand-off to a pipeline thread and back per command (ReuseThread
                // cost ~0.08 ms more per command). Cancel still works: the inbox thread calls BeginStop.
                runspace.ThreadOptions = PSThreadOptions.UseCurrentThread;
                runspace.Open();
                SendDone(request.Id, "Completed", false, watch.Elapsed.TotalMilliseconds);
            }
            catch (RunspaceOpenModuleLoadException e)
            {
                var records = e.ErrorRecords;
                if (records != null) foreach (var record in records) SendError(request.Id, record, true);
                if (records == null || records.Count == 0) SendError(request.Id, e.ErrorRecord, true);
                SendDone(request.Id, "Failed", true, watch.Elapsed.TotalMilliseconds);
            }
            catch (Exception e)
            {
                SendError(request.Id, ToRecord(e, "SetupFailed"), true);
                SendDone(request.Id, "Failed", true, watch.Elapsed.TotalMilliseconds);
            }
        }

        private static ModuleSpecification ModuleSpec(JsonElement module)
        {
            var spec = new Hashtable { ["ModuleName"] = module.GetProperty("name").GetString() };
            if (module.TryGetProperty("minimum_version", out var min) && min.ValueKind == JsonValueKind.String) spec["ModuleVersion"] = min.GetString();
            else return new ModuleSpecification((string)spec["ModuleName"]);
            return new ModuleSpecification(spec);
        }

        private void Invoke(Request request)
        {
            long id = request.Id;
            var watch = Stopwatch.StartNew();
            if (runspace == null)
            {
                SendError(id, ToRecord(new InvalidOperationException("the worker has not been set up"), "NotSetUp"), true);
                SendDone(id, "Failed", true, 0);
                return;
            }
            using var ps = PowerShell.Create();
            ps.Runspace = runspace;
            bool terminatingSent = false, stoppedBeforeStart = false;
            errorsWritten = false;
            exitCode = null;
            var body = request.Body;
            var serializer = new Serializer(body.TryGetProperty("depth", out var depth) ? depth.GetInt32() : sessionDepth);
            try
            {
                Build(ps, body);
                Attach(ps, id);
                var output = new PSDataCollection<PSObject>();
                output.DataAdded += (sender, e) =>
                {
                    // ReadAll removes what was sent: the collection never holds more than one object.
                    foreach (var item in output.ReadAll()) SendOutput(id, item, serializer);
                };
                ForgetLastExitCode();
                RethrowExitFromScriptFile(FirstCommand(body));
                if (Begin(ps, id)) ps.Invoke<PSObject, PSObject>(null, output, null);
                else stoppedBeforeStart = true;
            }
            catch (PipelineStoppedException) { }
            catch (RuntimeException e)
            {
                SendError(id, e.ErrorRecord, true);
                terminatingSent = true;
            }
            catch (Exception e) // bad parameters from the owner, a cmdlet that throws a plain .NET exception
            {
                SendError(id, ToRecord(e, e.GetType().Name), true);
                terminatingSent = true;
            }
            finally
            {
                host.Flush();
                RethrowExitFromScriptFile(null);
                lock (currentGate) { current = null; currentId = -1; }
            }
            if (stoppedBeforeStart) { SendDone(id, "Stopped", false, watch.Elapsed.TotalMilliseconds); return; }
            string state = ps.InvocationStateInfo.State == PSInvocationState.Stopped ? "Stopped"
                : terminatingSent ? "Failed" : "Completed";
            // PowerShell's HadErrors reads the error collection, which the handler above empties as it
            // sends; so "an error record was written" is tracked here as well.
            SendDone(id, state, ps.HadErrors || errorsWritten || terminatingSent, watch.Elapsed.TotalMilliseconds, exitCode, NativeExitCode());
        }

        /// <summary>Makes `ps` the running request, unless its cancel came first (it arrived after the request
        /// was taken from the queue): then false, and the request is answered Stopped without running.</summary>
        private bool Begin(PowerShell ps, long id)
        {
            lock (Inbox.CancelGate)
            {
                if (Inbox.TakeCancelled(id)) return false;
                lock (currentGate) { current = ps; currentId = id; }
                return true;
            }
        }

        /// <summary>The first step's command name, or null for a script.</summary>
        private static string FirstCommand(JsonElement body)
        {
            foreach (var step in body.GetProperty("pipeline").EnumerateArray())
            {
                return step.TryGetProperty("command", out var command) ? command.GetString() : null;
            }
            return null;
        }

        /// <summary>
        /// `exit N` in a script file run as the request's command ends the request with N, as `pwsh -File`
        /// does; PowerShell's default for a hosted pipeline is to end only the script and set $LASTEXITCODE.
        /// </summary>
        /// <remarks>
        /// The switch is an internal of PowerShell's ExecutionContext that the console host sets for -File.
        /// It is consumed by the next script command processor PowerShell creates, so it is set only when
        /// the first command is a .ps1 (that processor is the script's own) and cleared after every request,
        /// so that it can never leak into a later one. Where the member is missing, `exit` in a script file
        /// only sets $LASTEXITCODE, as it does in any hosted pipeline.
        /// </remarks>
        private void RethrowExitFromScriptFile(string command)
        {
            bool on = command != null && command.EndsWith(".ps1", StringComparison.OrdinalIgnoreCase);
            var context = ExecutionContextProperty?.GetValue(runspace);
            var property = context?.GetType().GetProperty("ScriptCommandProcessorShouldRethrowExit",
                System.Reflection.BindingFlags.NonPublic | System.Reflection.BindingFlags.Public | System.Reflection.BindingFlags.Instance);
            if (property != null && (on || (bool)property.GetValue(context))) property.SetValue(context, on);
        }

        /// <summary>$LASTEXITCODE is per request: a native program run by an earlier request is not this one's.</summary>
        private void ForgetLastExitCode()
        {
            // Set() on an existing variable keeps the old object (and so the old watcher): remove it first.
            runspace.SessionStateProxy.PSVariable.Remove("global:LASTEXITCODE");
            lastExitCode = new LastExitCodeVariable();
            runspace.SessionStateProxy.PSVariable.Set(lastExitCode);
        }

        private LastExitCodeVariable lastExitCode;

        private int? NativeExitCode() => lastExitCode?.Native;

        /// <summary>The global $LASTEXITCODE, watched: it tells a native program's exit code from `exit`'s.</summary>
        /// <remarks>
        /// PowerShell also writes $LASTEXITCODE when a script file calls `exit N`, so its value after the
        /// request cannot tell `exit 7` from a native program that returned 7. Each write is attributed to
        /// the command processor nearest on the stack: NativeCommandProcessor for a program that ended, a
        /// script command processor for a script file's `exit`. (A .ps1 that is the request's own command
        /// ends the request instead: its write replaces the variable and never reaches this setter.)
        /// Walking the stack costs microseconds, once per native program.
        /// </remarks>
        private sealed class LastExitCodeVariable : PSVariable
        {
            public LastExitCodeVariable() : base("LASTEXITCODE", null, ScopedItemOptions.None) { }

            public int? Native { get; private set; }

            private static bool WrittenByNativeCommand()
            {
                foreach (var frame in new StackTrace(false).GetFrames())
                {
                    string type = frame.GetMethod()?.DeclaringType?.Name ?? "";
                    if (type == "NativeCommandProcessor") return true;
                    if (type.EndsWith("CommandProcessor", StringComparison.Ordinal) || type.EndsWith("CommandProcessorBase", StringComparison.Ordinal)) return false;
                }
                return true; // no processor on the stack: PowerShell changed; report the write rather than lose it
            }

            public override object Value
            {
                get => base.Value;
                set
                {
                    base.Value = value;
                    if (value is int code && WrittenByNativeCommand()) Native = code;
                }
            }
        }

        /// <summary>Adds the steps of a request. Values are bound as parameters, never spliced into script text.</summary>
        private static void Build(PowerShell ps, JsonElement body)
        {
            foreach (var step in body.GetProperty("pipeline").EnumerateArray())
            {
                if (step.TryGetProperty("script", out var script)) ps.AddScript(script.GetString(), false);
                else ps.AddCommand(step.GetProperty("command").GetString());
                AddParameters(ps, step);
            }
        }

        private static void AddParameters(PowerShell ps, JsonElement holder)
        {
            if (!holder.TryGetProperty("parameters", out var parameters) || parameters.ValueKind != JsonValueKind.Object) return;
            foreach (var p in parameters.EnumerateObject()) ps.AddParameter(p.Name, Values.Parameter(p.Name, p.Value));
        }

        /// <summary>Sends every record as it is written, so that the owner sees the streams in order.</summary>
        private void Attach(PowerShell ps, long id)
        {
            var s = ps.Streams;
            s.Error.DataAdded += (_, __) =>
            {
                foreach (var r in s.Error.ReadAll()) SendError(id, r, false);
                errorsWritten = true;
            };
            s.Warning.DataAdded += (_, __) => { foreach (var r in s.Warning.ReadAll()) SendText("warn", id, r.Message); };
            s.Verbose.DataAdded += (_, __) => { foreach (var r in s.Verbose.ReadAll()) SendText("verbose", id, r.Message); };
            s.Debug.DataAdded += (_, __) => { foreach (var r in s.Debug.ReadAll()) SendText("debug", id, r.Message); };
            s.Information.DataAdded += (_, __) =>
            {
                foreach (var r in s.Information.ReadAll())
                {
                    Protocol.Send("info", id, w => Serializer.WriteInformation(w, r));
                    BridgeHostUI.ExpectEcho(r.MessageData?.ToString());
                }
            };
            s.Progress.DataAdded += (_, __) =>
            {
                foreach (var r in s.Progress.ReadAll()) Protocol.Send("progress", id, w => Serializer.WriteProgress(w, r));
            };
        }

        private static void SendOutput(long id, PSObject item, Serializer serializer)
        {
            Protocol.Send("out", id, w =>
            {
                Serializer.WriteTypeNames(w, item);
                w.WritePropertyName("v");
                serializer.WriteObject(w, item);
            });
            string cut = serializer.TakeCutWarning(item);
            if (cut != null) SendText("warn", id, cut);
        }

        private static void SendText(string type, long id, string text) => Protocol.Send(type, id, w => w.WriteString("v", text));

        private static void SendError(long id, ErrorRecord record, bool terminating) =>
            Protocol.Send("err", id, w => Serializer.WriteErrorRecord(w, record, terminating));

        private static void SendDone(long id, string state, bool hadErrors, double ms, int? exit = null, int? native = null)
        {
            Protocol.Send("done", id, w =>
            {
                w.WriteString("state", state);
                w.WriteBoolean("had_errors", hadErrors);
                w.WriteNumber("duration_ms", ms);
                if (exit.HasValue) w.WriteNumber("exit_code", exit.Value);
                if (native.HasValue) w.WriteNumber("native_exit_code", native.Value);
            });
        }

        private static ErrorRecord ToRecord(Exception e, string id) =>
            e is IContainsErrorRecord c ? c.ErrorRecord : new ErrorRecord(e, id, ErrorCategory.NotSpecified, null);
    }
}
