// psbridge worker host: the compiled half of scripts/worker/worker.ps1, one file per concept (Add-Type
// compiles them together, once per user and PowerShell version, cached as a DLL). Everything in host/
// exists for one of three reasons:
//   * speed: serializing PowerShell objects to JSON in script code is an order of magnitude slower;
//   * threads: cancel messages must be read while a pipeline runs, which needs a real thread;
//   * the operating system: keeping fd 1 private needs dup/dup2 (SetStdHandle on Windows).
//
// Protocol (one JSON object per line, UTF-8, no BOM; PROTOCOL.md describes every message):
//   worker -> owner: ready, out, err, warn, verbose, debug, info, progress, done, fatal
//   owner -> worker: setup, invoke, cancel, exit
// Every message about a request carries its "id" so that late messages of an abandoned request can be
// told apart from the current one. A worker hosts one or more runspaces (setup and invoke name theirs
// in "runspace", default 0), each running its own requests on a thread of its own (Lanes.cs).
//
// This file: the protocol stream and the guard that keeps stdin and stdout for it.

namespace PsBridge
{
    /// <summary>Owns the protocol stream: the only writer of protocol lines.</summary>
    public static class Protocol
    {
        public const int Version = 2;

        /// <summary>How deeply arrays and objects may nest in one parameter value: psbridge::MAX_VALUE_DEPTH
        /// in src/command.rs, which refuses deeper values before sending (a unit test keeps the two equal).</summary>
        public const int MaxValueDepth = 64;

        /// <summary>The request's own levels around a value: message, pipeline, step, parameters.</summary>
        public const int RequestDepth = MaxValueDepth + 4;

        private static readonly object Gate = new object();
        private static readonly JsonWriterOptions WriterOptions = new JsonWriterOptions
        {
            // Raw UTF-8 instead of \uXXXX for every non-ASCII character: smaller and faster. Still valid JSON.
            Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
            SkipValidation = true,
        };
        // Each thread (every runspace's own, the inbox's) builds its messages in a buffer of its own, so
        // that runspaces serialize their output in parallel and take the lock only to write a finished line.
        [ThreadStatic] private static ArrayBufferWriter<byte> buffer;
        [ThreadStatic] private static Utf8JsonWriter writer;
        private static Stream output;

        /// <summary>Takes fd 1 (stdout) for the protocol and points everything else at stderr.</summary>
        public static void Claim()
        {
            output = StdioGuard.TakeStdout();
        }

        /// <summary>Writes one message. Thread-safe; blocks while the owner is not reading (backpressure).</summary>
        public static void Send(string type, long? id, Action<Utf8JsonWriter> body)
        {
            if (buffer == null)
            {
                buffer = new ArrayBufferWriter<byte>(64 * 1024);
                writer = new Utf8JsonWriter(buffer, WriterOptions);
            }
            buffer.Clear();
            writer.Reset(buffer);
            writer.WriteStartObject();
            writer.WriteString("t", type);
            if (id.HasValue) writer.WriteNumber("id", id.Value);
            body?.Invoke(writer);
            writer.WriteEndObject();
            writer.Flush();
            buffer.GetSpan(1)[0] = (byte)'\n';
            buffer.Advance(1);
            lock (Gate)
            {
                output.Write(buffer.WrittenSpan); // one write per message: the owner never sees half a line late
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
                var nul = File.Open("NUL", FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
                SetStdHandle(STD_INPUT, nul.SafeFileHandle.DangerousGetHandle());
                return new FileStream(new SafeFileHandle(real, false), FileAccess.Read, 1);
            }
            int fd = Check(dup(0), "dup(0)");
            Check(fcntl(fd, F_SETFD, FD_CLOEXEC), "fcntl");
            // FileShare.ReadWrite: File.Open's default, FileShare.None, makes .NET take an exclusive flock on
            // the file, and /dev/null is one file for every process, so workers starting at the same moment
            // failed with "being used by another process".
            var devnull = File.Open("/dev/null", FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
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
}
