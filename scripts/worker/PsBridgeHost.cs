// psbridge worker host: the compiled half of scripts/worker/worker.ps1.
//
// The script compiles this file once per user and PowerShell version (Add-Type, cached as a DLL) and
// drives it. Everything here exists for one of three reasons:
//   * speed: serializing PowerShell objects to JSON in script code is an order of magnitude slower;
//   * threads: cancel messages must be read while a pipeline runs, which needs a real thread;
//   * the operating system: keeping fd 1 private needs dup/dup2 (SetStdHandle on Windows).
//
// Protocol (one JSON object per line, UTF-8, no BOM):
//   worker -> owner: ready, out, err, warn, verbose, debug, info, progress, done, fatal
//   owner -> worker: setup, invoke, cancel, exit
// Every message about a request carries its "id" so that late messages of an abandoned request can be
// told apart from the current one.

using System;
using System.Buffers;
using System.Collections;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Collections.ObjectModel;
using System.Diagnostics;
using System.Globalization;
using System.IO;
using System.Management.Automation;
using System.Management.Automation.Host;
using System.Management.Automation.Runspaces;
using System.Runtime.InteropServices;
using System.Security;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using System.Threading;
using Microsoft.PowerShell.Commands;
using Microsoft.Win32.SafeHandles;

namespace PsBridge
{
    /// <summary>Owns the protocol stream: the only writer of protocol lines.</summary>
    public static class Protocol
    {
        public const int Version = 1;

        /// <summary>How deeply arrays and objects may nest in one parameter value: psbridge::MAX_VALUE_DEPTH
        /// in src/command.rs, which refuses deeper values before sending (a unit test keeps the two equal).</summary>
        public const int MaxValueDepth = 64;

        /// <summary>The request's own levels around a value: message, pipeline, step, parameters.</summary>
        public const int RequestDepth = MaxValueDepth + 4;

        private static readonly object Gate = new object();
        private static readonly ArrayBufferWriter<byte> Buffer = new ArrayBufferWriter<byte>(64 * 1024);
        private static readonly JsonWriterOptions WriterOptions = new JsonWriterOptions
        {
            // Raw UTF-8 instead of \uXXXX for every non-ASCII character: smaller and faster. Still valid JSON.
            Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
            SkipValidation = true,
        };
        private static Utf8JsonWriter writer;
        private static Stream output;

        /// <summary>Takes fd 1 (stdout) for the protocol and points everything else at stderr.</summary>
        public static void Claim()
        {
            output = StdioGuard.TakeStdout();
            writer = new Utf8JsonWriter(Buffer, WriterOptions);
        }

        /// <summary>Writes one message. Thread-safe; blocks while the owner is not reading (backpressure).</summary>
        public static void Send(string type, long? id, Action<Utf8JsonWriter> body)
        {
            lock (Gate)
            {
                Buffer.Clear();
                writer.Reset(Buffer);
                writer.WriteStartObject();
                writer.WriteString("t", type);
                if (id.HasValue) writer.WriteNumber("id", id.Value);
                body?.Invoke(writer);
                writer.WriteEndObject();
                writer.Flush();
                Buffer.GetSpan(1)[0] = (byte)'\n';
                Buffer.Advance(1);
                output.Write(Buffer.WrittenSpan); // one write per message: the owner never sees half a line late
                output.Flush();
            }
        }
    }

    /// <summary>Keeps the real stdin and stdout for the protocol and gives everyone else stand-ins.</summary>
    /// <remarks>
    /// Modules and commands write to the console in many ways: [Console]::WriteLine, banners, native
    /// programs that inherit fd 1. Redirecting [Console]::Out is not enough for native programs, so on
    /// Unix fd 1 is duplicated for the protocol and fd 2 is copied over fd 1; fd 0 is duplicated and
    /// /dev/null put in its place so that a native program cannot swallow protocol messages.
    /// </remarks>
    public static class StdioGuard
    {
        [DllImport("libc", SetLastError = true)] private static extern int dup(int fd);
        [DllImport("libc", SetLastError = true)] private static extern int dup2(int oldfd, int newfd);
        [DllImport("libc", SetLastError = true)] private static extern int fcntl(int fd, int cmd, int arg);
        [DllImport("kernel32.dll", SetLastError = true)] private static extern IntPtr GetStdHandle(int which);
        [DllImport("kernel32.dll", SetLastError = true)] private static extern bool SetStdHandle(int which, IntPtr handle);

        private const int F_SETFD = 2, FD_CLOEXEC = 1;
        private const int STD_INPUT = -10, STD_OUTPUT = -11, STD_ERROR = -12;
        private static readonly UTF8Encoding Utf8 = new UTF8Encoding(false);

        public static Stream TakeStdout()
        {
            Stream protocol;
            if (OperatingSystem.IsWindows())
            {
                IntPtr real = GetStdHandle(STD_OUTPUT);
                SetStdHandle(STD_OUTPUT, GetStdHandle(STD_ERROR));
                protocol = new FileStream(new SafeFileHandle(real, false), FileAccess.Write, 1);
            }
            else
            {
                int real = Check(dup(1), "dup(1)");
                Check(fcntl(real, F_SETFD, FD_CLOEXEC), "fcntl"); // children must not inherit the protocol
                Check(dup2(2, 1), "dup2(2, 1)");
                protocol = new FileStream(new SafeFileHandle((IntPtr)real, true), FileAccess.Write, 1);
            }
            var stderr = new StreamWriter(Console.OpenStandardError(), Utf8) { AutoFlush = true };
            Console.SetOut(stderr);
            return protocol;
        }

        public static Stream TakeStdin()
        {
            if (OperatingSystem.IsWindows())
            {
                IntPtr real = GetStdHandle(STD_INPUT);
                var nul = File.Open("NUL", FileMode.Open, FileAccess.Read);
                SetStdHandle(STD_INPUT, nul.SafeFileHandle.DangerousGetHandle());
                return new FileStream(new SafeFileHandle(real, false), FileAccess.Read, 1);
            }
            int fd = Check(dup(0), "dup(0)");
            Check(fcntl(fd, F_SETFD, FD_CLOEXEC), "fcntl");
            var devnull = File.Open("/dev/null", FileMode.Open, FileAccess.Read);
            Check(dup2((int)devnull.SafeFileHandle.DangerousGetHandle(), 0), "dup2(null, 0)");
            devnull.Dispose();
            return new FileStream(new SafeFileHandle((IntPtr)fd, true), FileAccess.Read, 1);
        }

        [DllImport("libc", SetLastError = true)] private static extern int kill(int pid, int sig);

        /// <summary>Ends the worker and, when psbridge gave it a process group of its own, everything it started.</summary>
        /// <remarks>An owner killed with SIGKILL cannot end the group itself; its stdin EOF is our only signal.</remarks>
        public static void EndOrphanedWorker()
        {
            if (!OperatingSystem.IsWindows() && Environment.GetEnvironmentVariable("PSBRIDGE_OWN_GROUP") == "1")
            {
                kill(0, 9); // SIGKILL to our whole process group, this process included
            }
            Environment.Exit(0);
        }

        private static int Check(int result, string what)
        {
            if (result < 0) throw new IOException(what + " failed: errno " + Marshal.GetLastWin32Error());
            return result;
        }
    }

    /// <summary>One message from the owner, parsed.</summary>
    public sealed class Request
    {
        public string Type;
        public long Id;
        public JsonElement Body;
    }

    /// <summary>Reads owner messages on a thread of its own so that cancel works while a pipeline runs.</summary>
    public static class Inbox
    {
        private static readonly BlockingCollection<Request> Queue = new BlockingCollection<Request>();
        private static readonly ConcurrentDictionary<long, bool> Cancelled = new ConcurrentDictionary<long, bool>();
        private static volatile bool exiting;

        public static void Start()
        {
            var stdin = StdioGuard.TakeStdin();
            var thread = new Thread(() => ReadLoop(stdin)) { IsBackground = true, Name = "psbridge-inbox" };
            thread.Start();
        }

        /// <summary>The next request for the main loop; null once the owner said exit.</summary>
        public static Request Take()
        {
            var request = Queue.Take();
            return request.Type == "exit" ? null : request;
        }

        /// <summary>True (once) when the owner cancelled this request before it started.</summary>
        public static bool TakeCancelled(long id) => Cancelled.TryRemove(id, out _);

        private static void ReadLoop(Stream stdin)
        {
            var reader = new StreamReader(stdin, new UTF8Encoding(false), false, 64 * 1024);
            while (true)
            {
                string line;
                try { line = reader.ReadLine(); }
                catch (IOException) { line = null; }
                if (line == null)
                {
                    // EOF: the owner is gone (or closed us after "exit"). Without an owner nobody reads our
                    // output, so leave at once, even in the middle of a command.
                    if (!exiting) StdioGuard.EndOrphanedWorker();
                    return;
                }
                if (line.Length == 0) continue;
                Request request;
                try { request = Parse(line); }
                catch (Exception e)
                {
                    Protocol.Send("fatal", null, w => w.WriteString("message", "unparsable request: " + e.Message));
                    continue;
                }
                switch (request.Type)
                {
                    case "cancel":
                        if (!Executor.StopIfRunning(request.Id)) Cancelled[request.Id] = true;
                        break;
                    case "exit":
                        exiting = true;
                        Queue.Add(request);
                        return;
                    default:
                        Queue.Add(request);
                        break;
                }
            }
        }

        private static Request Parse(string line)
        {
            var doc = JsonDocument.Parse(line, new JsonDocumentOptions { MaxDepth = Protocol.RequestDepth });
            var root = doc.RootElement;
            var request = new Request { Type = root.GetProperty("t").GetString(), Body = root };
            if (root.TryGetProperty("id", out var id) && id.ValueKind == JsonValueKind.Number) request.Id = id.GetInt64();
            return request;
        }
    }

    /// <summary>Turns protocol parameter values into the .NET values cmdlets bind to.</summary>
    /// <remarks>
    /// JSON has no dates, secure strings or byte arrays, so those travel as {"$psbridge": kind, "value": ...}.
    /// Objects become hashtables, arrays object[]. Numbers follow PowerShell's rules for literals: an integer
    /// is int when it fits, else long, else decimal, else BigInteger (always exact, never rounded to a
    /// double); a number with a fraction or an exponent is double.
    /// </remarks>
    public static class Values
    {
        public static object From(JsonElement e)
        {
            switch (e.ValueKind)
            {
                case JsonValueKind.Null:
                case JsonValueKind.Undefined: return null;
                case JsonValueKind.True: return true;
                case JsonValueKind.False: return false;
                case JsonValueKind.String: return e.GetString();
                case JsonValueKind.Number: return Number(e);
                case JsonValueKind.Array:
                    var list = new object[e.GetArrayLength()];
                    int n = 0;
                    foreach (var item in e.EnumerateArray()) list[n++] = From(item);
                    return list;
                default:
                    if (e.TryGetProperty("$psbridge", out var kind)) return Tagged(kind.GetString(), e);
                    var table = new Hashtable(StringComparer.OrdinalIgnoreCase);
                    foreach (var p in e.EnumerateObject()) table[p.Name] = From(p.Value);
                    return table;
            }
        }

        private static object Number(JsonElement e)
        {
            if (e.TryGetInt32(out var i)) return i;
            if (e.TryGetInt64(out var l)) return l;
            string raw = e.GetRawText();
            if (raw.IndexOfAny(new[] { '.', 'e', 'E' }) < 0)
            {
                if (decimal.TryParse(raw, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var m)) return m;
                return System.Numerics.BigInteger.Parse(raw, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture);
            }
            if (e.TryGetDouble(out var d)) return d;
            throw new ArgumentException("the number " + raw + " is beyond the range of a double");
        }

        /// <summary>A certificate with its private key from a base64 PFX, kept in memory only.</summary>
        /// <remarks>EphemeralKeySet keeps the private key out of the user's key store on disk; the PFX's bytes
        /// are wiped once loaded. A wrong password fails here, with .NET's own message.</remarks>
        private static System.Security.Cryptography.X509Certificates.X509Certificate2 Certificate(string pfxBase64, string password)
        {
            byte[] pfx;
            try { pfx = Convert.FromBase64String(pfxBase64 ?? ""); }
            catch (FormatException) { throw new ArgumentException("the certificate is not base64 (give the PFX file's bytes, base64-encoded)"); }
            try
            {
#pragma warning disable SYSLIB0057 // X509CertificateLoader is .NET 9+, and PowerShell 7.4 runs on .NET 8
                return new System.Security.Cryptography.X509Certificates.X509Certificate2(pfx, password,
                    System.Security.Cryptography.X509Certificates.X509KeyStorageFlags.EphemeralKeySet);
#pragma warning restore SYSLIB0057
            }
            catch (System.Security.Cryptography.CryptographicException e)
            {
                throw new ArgumentException("the certificate cannot be opened: " + e.Message +
                    (password == null ? " (no password was given)" : " (check its password)"), e);
            }
            finally { Array.Clear(pfx); }
        }

        /// <summary>A parameter's value; a value that cannot be read names the parameter.</summary>
        public static object Parameter(string name, JsonElement e)
        {
            try { return From(e); }
            catch (Exception ex) when (ex is ArgumentException || ex is FormatException || ex is InvalidOperationException || ex is OverflowException)
            {
                throw new ArgumentException("parameter " + name + ": " + ex.Message, ex);
            }
        }

        private static object Tagged(string kind, JsonElement tagged)
        {
            if (!tagged.TryGetProperty("value", out var value)) throw new ArgumentException("the {\"$psbridge\": \"" + kind + "\"} value has no \"value\"");
            switch (kind)
            {
                case "securestring":
                    var secure = new SecureString();
                    foreach (char c in value.GetString()) secure.AppendChar(c);
                    secure.MakeReadOnly();
                    return secure;
                case "secret": return value.GetString();
                case "datetime":
                    var parsed = DateTimeOffset.Parse(value.GetString(), CultureInfo.InvariantCulture, DateTimeStyles.RoundtripKind);
                    return parsed.Offset == TimeSpan.Zero ? parsed.UtcDateTime : parsed.LocalDateTime;
                case "bytes": return Convert.FromBase64String(value.GetString());
                case "certificate": return Certificate(value.GetString(), tagged.TryGetProperty("password", out var password) ? password.GetString() : null);
                default:
                    throw new ArgumentException("unknown value tag {\"$psbridge\": \"" + kind + "\"}; the tags are securestring, secret, datetime, bytes and certificate");
            }
        }
    }

    /// <summary>Writes PowerShell objects as JSON: property names and values, depth-bounded, cycle-safe.</summary>
    /// <remarks>
    /// One per request (its depth is the session's, or the request's own). What is nested deeper than the
    /// depth is written as its ToString(), as ConvertTo-Json does; unlike ConvertTo-Json, each cut is
    /// remembered with the path of the property it was in, so that the request can warn about it.
    /// </remarks>
    public sealed class Serializer
    {
        /// <summary>How many cut paths one warning names; the rest are counted.</summary>
        private const int CutsNamed = 5;

        private readonly int maxDepth;
        private readonly HashSet<object> path = new HashSet<object>(ReferenceEqualityComparer.Instance);
        // Property names and indexes from the object's root to the value being written; a string is built
        // only when something is cut, so the common case costs a push and a pop per value.
        private readonly List<object> names = new List<object>();
        private readonly List<string> cuts = new List<string>();
        private int cutCount;

        public Serializer(int maxDepth) { this.maxDepth = maxDepth; }

        public int MaxDepth => maxDepth;

        public void WriteObject(Utf8JsonWriter w, object value)
        {
            path.Clear();
            names.Clear();
            Write(w, value, 0);
        }

        /// <summary>The warning for what the last objects lost to the depth limit, or null; then forgets them.</summary>
        public string TakeCutWarning(object value)
        {
            if (cutCount == 0) return null;
            string type = value is PSObject pso && pso.TypeNames.Count > 0 ? pso.TypeNames[0] : value?.GetType().FullName ?? "null";
            string more = cutCount > cuts.Count ? " and " + (cutCount - cuts.Count) + " more" : "";
            string text = "psbridge: " + type + ": " + string.Join(", ", cuts) + more + (cutCount == 1 ? " is" : " are") +
                " nested deeper than the serialization depth " + maxDepth + " and arrived as text (its ToString()); " +
                "raise the depth (--depth, the profile's depth, RunspaceBuilder::depth or Command::depth) or select the properties you need";
            cuts.Clear();
            cutCount = 0;
            return text;
        }

        private void NoteCut()
        {
            cutCount++;
            if (cuts.Count >= CutsNamed) return;
            var text = new StringBuilder();
            foreach (var name in names)
            {
                if (name is int index) text.Append('[').Append(index).Append(']');
                else { if (text.Length > 0) text.Append('.'); text.Append(name); }
            }
            cuts.Add(text.Length == 0 ? "the object" : text.ToString());
        }

        public static void WriteTypeNames(Utf8JsonWriter w, object value)
        {
            w.WriteStartArray("types");
            if (value is PSObject pso) foreach (var name in pso.TypeNames) w.WriteStringValue(name);
            else if (value != null) foreach (var name in PSObject.AsPSObject(value).TypeNames) w.WriteStringValue(name);
            w.WriteEndArray();
        }

        private void Write(Utf8JsonWriter w, object value, int depth)
        {
            if (value == null || value is DBNull || value == System.Management.Automation.Internal.AutomationNull.Value) { w.WriteNullValue(); return; }
            var pso = value as PSObject;
            object baseObject = pso != null ? pso.BaseObject : value;
            if (WriteScalar(w, baseObject)) return;

            // Every [pscustomobject] shares one BaseObject instance, so such an object is known by its PSObject.
            bool custom = baseObject is PSCustomObject && pso != null;
            object identity = custom ? pso : baseObject;
            // Containers and complex objects: cut at the depth limit and on cycles, as ConvertTo-Json does.
            if (depth >= maxDepth)
            {
                NoteCut();
                w.WriteStringValue(SafeToString(identity));
                return;
            }
            if (!path.Add(identity)) { w.WriteStringValue(SafeToString(identity)); return; } // a cycle: its text
            try
            {
                if (custom) WriteProperties(w, pso, depth);
                else if (baseObject is IDictionary dictionary) WriteDictionary(w, dictionary, depth);
                else if (baseObject is IEnumerable enumerable) WriteArray(w, enumerable, depth);
                else WriteProperties(w, pso ?? PSObject.AsPSObject(baseObject), depth);
            }
            finally { path.Remove(identity); }
        }

        private static bool WriteScalar(Utf8JsonWriter w, object v)
        {
            switch (v)
            {
                case string s: w.WriteStringValue(s); return true;
                case bool b: w.WriteBooleanValue(b); return true;
                case int i: w.WriteNumberValue(i); return true;
                case long l: w.WriteNumberValue(l); return true;
                case double d: WriteFloat(w, d); return true;
                case float f: WriteFloat(w, f); return true;
                case decimal m: w.WriteNumberValue(m); return true;
                case byte b8: w.WriteNumberValue(b8); return true;
                case sbyte s8: w.WriteNumberValue(s8); return true;
                case short s16: w.WriteNumberValue(s16); return true;
                case ushort u16: w.WriteNumberValue(u16); return true;
                case uint u32: w.WriteNumberValue(u32); return true;
                case ulong u64: w.WriteNumberValue(u64); return true;
                case System.Numerics.BigInteger big: w.WriteRawValue(big.ToString(CultureInfo.InvariantCulture), true); return true;
                case char c: w.WriteStringValue(c.ToString()); return true;
                case DateTime dt: w.WriteStringValue(FormatDate(dt)); return true;
                case DateTimeOffset dto: w.WriteStringValue(dto.ToString("yyyy-MM-dd'T'HH:mm:ss.FFFFFFFzzz", CultureInfo.InvariantCulture)); return true;
                case Guid g: w.WriteStringValue(g.ToString("D")); return true;
                case Enum e: w.WriteStringValue(e.ToString()); return true;
                case TimeSpan ts: w.WriteStringValue(ts.ToString("c", CultureInfo.InvariantCulture)); return true;
                case byte[] bytes: w.WriteBase64StringValue(bytes); return true;
                case SwitchParameter sw: w.WriteBooleanValue(sw.IsPresent); return true;
                case SecureString _: w.WriteStringValue("System.Security.SecureString"); return true;
                case ScriptBlock sb: w.WriteStringValue(sb.ToString()); return true;
                case Type t: w.WriteStringValue(t.FullName); return true;
                case Uri u: w.WriteStringValue(u.OriginalString); return true;
                case Version ver: w.WriteStringValue(ver.ToString()); return true;
                case System.Net.IPAddress ip: w.WriteStringValue(ip.ToString()); return true;
                default: return false;
            }
        }

        private static void WriteFloat(Utf8JsonWriter w, double d)
        {
            if (double.IsFinite(d)) w.WriteNumberValue(d);
            else w.WriteStringValue(d.ToString(CultureInfo.InvariantCulture));
        }

        /// <summary>ISO 8601 with offset; an unspecified kind is taken as local time, as PowerShell does.</summary>
        public static string FormatDate(DateTime dt)
        {
            if (dt.Kind == DateTimeKind.Utc) return dt.ToString("yyyy-MM-dd'T'HH:mm:ss.FFFFFFF'Z'", CultureInfo.InvariantCulture);
            var local = dt.Kind == DateTimeKind.Local ? dt : DateTime.SpecifyKind(dt, DateTimeKind.Local);
            return new DateTimeOffset(local).ToString("yyyy-MM-dd'T'HH:mm:ss.FFFFFFFzzz", CultureInfo.InvariantCulture);
        }

        private void WriteProperties(Utf8JsonWriter w, PSObject pso, int depth)
        {
            w.WriteStartObject();
            foreach (var property in pso.Properties)
            {
                if (!property.IsGettable) continue;
                object value;
                try { value = property.Value; }
                catch (Exception) { value = null; } // a getter that throws must not lose the whole object
                w.WritePropertyName(property.Name);
                WriteNamed(w, property.Name, value, depth);
            }
            w.WriteEndObject();
        }

        private void WriteDictionary(Utf8JsonWriter w, IDictionary dictionary, int depth)
        {
            w.WriteStartObject();
            foreach (DictionaryEntry entry in dictionary)
            {
                string key = SafeToString(entry.Key);
                w.WritePropertyName(key);
                WriteNamed(w, key, entry.Value, depth);
            }
            w.WriteEndObject();
        }

        private void WriteArray(Utf8JsonWriter w, IEnumerable items, int depth)
        {
            w.WriteStartArray();
            int index = 0;
            foreach (var item in items) WriteNamed(w, index++, item, depth);
            w.WriteEndArray();
        }

        private void WriteNamed(Utf8JsonWriter w, object name, object value, int depth)
        {
            names.Add(name);
            Write(w, value, depth + 1);
            names.RemoveAt(names.Count - 1);
        }

        private static string SafeToString(object o)
        {
            try { return o?.ToString() ?? ""; }
            catch (Exception) { return o.GetType().FullName; }
        }

        public static void WriteErrorRecord(Utf8JsonWriter w, ErrorRecord r, bool terminating)
        {
            w.WriteStartObject("v");
            var exception = r.Exception;
            w.WriteString("message", r.ErrorDetails?.Message ?? exception?.Message ?? r.ToString());
            w.WriteString("exception_message", exception?.Message);
            w.WriteString("exception_type", exception?.GetType().FullName);
            w.WriteString("fully_qualified_error_id", r.FullyQualifiedErrorId);
            var info = r.CategoryInfo;
            w.WriteString("category", info.Category.ToString());
            w.WriteString("activity", info.Activity);
            w.WriteString("reason", info.Reason);
            w.WriteString("target_name", info.TargetName);
            w.WriteString("target_type", info.TargetType);
            w.WriteString("category_info", info.GetMessage(CultureInfo.InvariantCulture));
            w.WriteString("target_object", r.TargetObject is SecureString ? "System.Security.SecureString" : r.TargetObject?.ToString());
            w.WriteString("script_stack_trace", r.ScriptStackTrace);
            w.WriteString("position_message", r.InvocationInfo?.PositionMessage);
            w.WriteString("command", r.InvocationInfo?.MyCommand?.Name);
            w.WriteBoolean("terminating", terminating);
            w.WriteEndObject();
        }

        public static void WriteInformation(Utf8JsonWriter w, InformationRecord r)
        {
            w.WriteStartObject("v");
            w.WriteString("message", r.MessageData?.ToString());
            w.WriteString("source", r.Source);
            w.WriteStartArray("tags");
            foreach (var tag in r.Tags) w.WriteStringValue(tag);
            w.WriteEndArray();
            w.WriteString("time_generated", FormatDate(r.TimeGenerated));
            w.WriteEndObject();
        }

        public static void WriteProgress(Utf8JsonWriter w, ProgressRecord r)
        {
            w.WriteStartObject("v");
            w.WriteString("activity", r.Activity);
            w.WriteString("status_description", r.StatusDescription);
            w.WriteString("current_operation", r.CurrentOperation);
            w.WriteNumber("activity_id", r.ActivityId);
            w.WriteNumber("parent_activity_id", r.ParentActivityId);
            w.WriteNumber("percent_complete", r.PercentComplete);
            w.WriteNumber("seconds_remaining", r.SecondsRemaining);
            w.WriteString("record_type", r.RecordType.ToString());
            w.WriteEndObject();
        }
    }

    /// <summary>
    /// The PowerShell host of the session. Non-interactive: prompts fail with a clear message instead of
    /// blocking. Text written straight to the host (What if: lines, Out-Host) becomes Information records
    /// tagged PSHOST of the running request; records PowerShell also puts on their own streams (warnings,
    /// verbose, debug, progress, Write-Host) are not repeated here.
    /// </summary>
    public sealed class BridgeHost : PSHost
    {
        private readonly BridgeHostUI ui = new BridgeHostUI();
        private readonly Guid instanceId = Guid.NewGuid();

        public override string Name => "psbridge";
        public override Version Version => new Version(1, 0);
        public override Guid InstanceId => instanceId;
        public override PSHostUserInterface UI => ui;
        public override CultureInfo CurrentCulture => CultureInfo.CurrentCulture;
        public override CultureInfo CurrentUICulture => CultureInfo.CurrentUICulture;
        public override void EnterNestedPrompt() => throw BridgeHostUI.NonInteractive("a nested prompt");
        public override void ExitNestedPrompt() => throw BridgeHostUI.NonInteractive("a nested prompt");
        public override void NotifyBeginApplication() { }
        public override void NotifyEndApplication() { }
        // `exit N` in a command ends that command, never the worker; N is the request's exit code.
        public override void SetShouldExit(int exitCode) => Executor.NoteExit(exitCode);

        /// <summary>Sends what was written without a newline at the end of a request.</summary>
        public void Flush() => ui.Flush();
    }

    public sealed class BridgeHostUI : PSHostUserInterface
    {
        private readonly StringBuilder pending = new StringBuilder();
        private readonly BridgeRawUI raw = new BridgeRawUI();

        public override PSHostRawUserInterface RawUI => raw;

        // PowerShell shows an Information record (Write-Host, Write-Information with preference Continue) on
        // the host right after adding it to the stream. The owner already has it from the stream, so the
        // host's copy of the record just sent is dropped.
        [ThreadStatic] private static string echo;

        public static void ExpectEcho(string message) => echo = message;

        private static bool IsEcho(string value)
        {
            bool same = echo != null && echo == value;
            echo = null;
            return same;
        }

        public override void Write(string value)
        {
            if (IsEcho(value)) return;
            lock (pending) pending.Append(value);
        }
        public override void Write(ConsoleColor foregroundColor, ConsoleColor backgroundColor, string value) => Write(value);
        public override void WriteLine(string value)
        {
            if (IsEcho(value)) return;
            string line;
            lock (pending) { line = pending.Append(value).ToString(); pending.Clear(); }
            Emit(line);
        }
        public override void WriteErrorLine(string value) => WriteLine(value);
        // These records also reach their own streams, which is where the owner reads them.
        public override void WriteDebugLine(string message) { }
        public override void WriteVerboseLine(string message) { }
        public override void WriteWarningLine(string message) { }
        public override void WriteProgress(long sourceId, ProgressRecord record) { }
        public override void WriteInformation(InformationRecord record) { }

        public void Flush()
        {
            string rest = TakePending();
            if (rest.Length > 0) Emit(rest);
        }

        private string TakePending()
        {
            lock (pending)
            {
                string text = pending.ToString();
                pending.Clear();
                return text;
            }
        }

        private static void Emit(string text)
        {
            long id = Executor.CurrentId;
            if (id < 0) { Console.Error.WriteLine(text); return; } // host text outside any request: a log line
            Protocol.Send("info", id, w =>
            {
                w.WriteStartObject("v");
                w.WriteString("message", text);
                w.WriteString("source", "Host");
                w.WriteStartArray("tags");
                w.WriteStringValue("PSHOST");
                w.WriteEndArray();
                w.WriteString("time_generated", Serializer.FormatDate(DateTime.Now));
                w.WriteEndObject();
            });
        }

        public static PSInvalidOperationException NonInteractive(string what) => new PSInvalidOperationException(
            "psbridge workers are non-interactive and cannot show " + what + ". Pass the value as a parameter instead.");

        /// <summary>What the prompt showed, for the message: its caption, message and field names, non-empty ones.</summary>
        private static string Shown(params string[] parts)
        {
            var shown = string.Join(": ", Array.FindAll(parts, p => !string.IsNullOrWhiteSpace(p)));
            return shown.Length == 0 ? "" : " (" + shown + ")";
        }

        // Read-Host without -Prompt writes its prompt through Write() first; it is the pending text.
        public override string ReadLine() => throw NonInteractive("a prompt for input" + Shown(TakePending()));
        public override SecureString ReadLineAsSecureString() => throw NonInteractive("a prompt for a secret" + Shown(TakePending()));
        public override Dictionary<string, PSObject> Prompt(string caption, string message, Collection<FieldDescription> descriptions)
        {
            var fields = new List<string>();
            foreach (var field in descriptions) fields.Add(string.IsNullOrEmpty(field.Label) ? field.Name : field.Label);
            throw NonInteractive("a prompt for input" + Shown(caption, message, string.Join(", ", fields)));
        }

        /// <summary>
        /// A confirmation (ShouldProcess, ShouldContinue, or any choice with a No) is answered No: throwing
        /// here would end only the `if ($PSCmdlet.ShouldProcess(...))` statement that asked, and the script
        /// would go on to do what was not confirmed. The decline is reported as an error record.
        /// Other choice prompts (no No to pick) fail at once.
        /// </summary>
        public override int PromptForChoice(string caption, string message, Collection<ChoiceDescription> choices, int defaultChoice)
        {
            int no = -1;
            for (int i = 0; i < choices.Count; i++)
            {
                if (string.Equals(choices[i].Label.Replace("&", ""), "No", StringComparison.OrdinalIgnoreCase)) { no = i; break; }
            }
            if (no < 0) throw NonInteractive("a choice prompt" + Shown(caption, message));
            Executor.ReportDeclined(caption, message);
            return no;
        }

        public override PSCredential PromptForCredential(string caption, string message, string userName, string targetName) =>
            throw NonInteractive("a credential prompt" + Shown(caption, message, userName));
        public override PSCredential PromptForCredential(string caption, string message, string userName, string targetName,
            PSCredentialTypes allowedCredentialTypes, PSCredentialUIOptions options) =>
            throw NonInteractive("a credential prompt" + Shown(caption, message, userName));
    }

    /// <summary>A fixed 120-column screen, so that formatting cmdlets have a width to work with.</summary>
    public sealed class BridgeRawUI : PSHostRawUserInterface
    {
        private static readonly Size Screen = new Size(120, 50);
        public override ConsoleColor BackgroundColor { get; set; } = ConsoleColor.Black;
        public override ConsoleColor ForegroundColor { get; set; } = ConsoleColor.Gray;
        public override Size BufferSize { get => Screen; set { } }
        public override Coordinates CursorPosition { get; set; }
        public override int CursorSize { get; set; }
        public override bool KeyAvailable => false;
        public override Size MaxPhysicalWindowSize => Screen;
        public override Size MaxWindowSize => Screen;
        public override Coordinates WindowPosition { get; set; }
        public override Size WindowSize { get => Screen; set { } }
        public override string WindowTitle { get; set; } = "psbridge";
        public override void FlushInputBuffer() { }
        public override BufferCell[,] GetBufferContents(Rectangle rectangle) => throw BridgeHostUI.NonInteractive("the screen buffer");
        public override KeyInfo ReadKey(ReadKeyOptions options) => throw BridgeHostUI.NonInteractive("a key prompt");
        public override void ScrollBufferContents(Rectangle source, Coordinates destination, Rectangle clip, BufferCell fill) { }
        public override void SetBufferContents(Coordinates origin, BufferCell[,] contents) { }
        public override void SetBufferContents(Rectangle rectangle, BufferCell fill) { }
    }

    /// <summary>Builds the session (like InitialSessionState in Microsoft's C# sample) and runs requests in it.</summary>
    public static class Executor
    {
        private static Runspace runspace;
        private static readonly BridgeHost Host = new BridgeHost();
        private static readonly object CurrentGate = new object();
        private static PowerShell current;
        private static long currentId = -1;
        private static bool errorsWritten;
        private static int sessionDepth = 4;
        private static int? exitCode;
        // Where PowerShell keeps the switch that makes `exit` in a script file end the whole pipeline (as
        // under `pwsh -File`) instead of only that script; null where this PowerShell has no such member.
        private static readonly System.Reflection.PropertyInfo ExecutionContextProperty =
            typeof(Runspace).Assembly.GetType("System.Management.Automation.Runspaces.LocalRunspace")
                ?.GetProperty("ExecutionContext", System.Reflection.BindingFlags.NonPublic | System.Reflection.BindingFlags.Instance);

        /// <summary>The id of the running request, or -1.</summary>
        public static long CurrentId { get { lock (CurrentGate) return currentId; } }

        /// <summary>Called by the host when the running script calls `exit N`: the request ends with that code.</summary>
        public static void NoteExit(int code) => exitCode = code;

        /// <summary>Reports a confirmation the host declined, in the running request's error stream.</summary>
        public static void ReportDeclined(string caption, string message)
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

        /// <summary>Handles one request from the main loop.</summary>
        public static void Handle(Request request)
        {
            if (Inbox.TakeCancelled(request.Id)) { SendDone(request.Id, "Stopped", false, 0); return; }
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

        /// <summary>Called from the inbox thread: stops the running request if it is the one named.</summary>
        public static bool StopIfRunning(long id)
        {
            lock (CurrentGate)
            {
                if (current == null || currentId != id) return false;
                current.BeginStop(null, null); // Stop() has no bound of its own; the owner bounds the wait
                return true;
            }
        }

        public static void Close()
        {
            runspace?.Dispose();
        }

        private static void Setup(Request request)
        {
            var watch = Stopwatch.StartNew();
            var body = request.Body;
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
                runspace = RunspaceFactory.CreateRunspace(Host, iss);
                // Commands run on this (the main loop's) thread: always the same thread, so thread-affine
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

        private static void Invoke(Request request)
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
            bool terminatingSent = false;
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
                lock (CurrentGate) { current = ps; currentId = id; }
                ps.Invoke<PSObject, PSObject>(null, output, null);
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
                Host.Flush();
                RethrowExitFromScriptFile(null);
                lock (CurrentGate) { current = null; currentId = -1; }
            }
            string state = ps.InvocationStateInfo.State == PSInvocationState.Stopped ? "Stopped"
                : terminatingSent ? "Failed" : "Completed";
            // PowerShell's HadErrors reads the error collection, which the handler above empties as it
            // sends; so "an error record was written" is tracked here as well.
            SendDone(id, state, ps.HadErrors || errorsWritten || terminatingSent, watch.Elapsed.TotalMilliseconds, exitCode, NativeExitCode());
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
        private static void RethrowExitFromScriptFile(string command)
        {
            bool on = command != null && command.EndsWith(".ps1", StringComparison.OrdinalIgnoreCase);
            var context = ExecutionContextProperty?.GetValue(runspace);
            var property = context?.GetType().GetProperty("ScriptCommandProcessorShouldRethrowExit",
                System.Reflection.BindingFlags.NonPublic | System.Reflection.BindingFlags.Public | System.Reflection.BindingFlags.Instance);
            if (property != null && (on || (bool)property.GetValue(context))) property.SetValue(context, on);
        }

        /// <summary>$LASTEXITCODE is per request: a native program run by an earlier request is not this one's.</summary>
        private static void ForgetLastExitCode()
        {
            // Set() on an existing variable keeps the old object (and so the old watcher): remove it first.
            runspace.SessionStateProxy.PSVariable.Remove("global:LASTEXITCODE");
            lastExitCode = new LastExitCodeVariable();
            runspace.SessionStateProxy.PSVariable.Set(lastExitCode);
        }

        private static LastExitCodeVariable lastExitCode;

        private static int? NativeExitCode() => lastExitCode?.Native;

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
        private static void Attach(PowerShell ps, long id)
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
