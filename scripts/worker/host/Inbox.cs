// psbridge worker host: owner messages, read on a thread of their own.

namespace PsBridge
{
    /// <summary>One message from the owner, parsed.</summary>
    public sealed class Request
    {
        public string Type;
        public long Id;
        /// <summary>The runspace a setup or invoke is for ("runspace", default 0).</summary>
        public int Runspace;
        public JsonElement Body;
    }

    /// <summary>Reads owner messages on a thread of its own so that cancel works while a pipeline runs, and
    /// hands each request to the runspace it names (Lanes).</summary>
    public static class Inbox
    {
        private static readonly ConcurrentDictionary<long, bool> Cancelled = new ConcurrentDictionary<long, bool>();
        // Taken around "is it running? else remember the cancel" and around "was it cancelled? else it runs
        // now", so that a cancel arriving just as its request starts is never lost.
        public static readonly object CancelGate = new object();
        private static volatile bool exiting;

        public static void Start()
        {
            var stdin = StdioGuard.TakeStdin();
            var thread = new Thread(() => ReadLoop(stdin)) { IsBackground = true, Name = "psbridge-inbox" };
            thread.Start();
        }

        /// <summary>True (once) when the owner cancelled this request before it started. Call under CancelGate.</summary>
        public static bool TakeCancelled(long id) => Cancelled.TryRemove(id, out _);

        private static void ReadLoop(Stream stdin)
        {
            var reader = new LineReader(stdin);
            while (true)
            {
                byte[] line;
                try { line = reader.Next(); }
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
                        lock (CancelGate)
                        {
                            if (!Lanes.StopIfRunning(request.Id)) Cancelled[request.Id] = true;
                        }
                        break;
                    case "exit":
                        exiting = true;
                        Lanes.Exit();
                        return;
                    default:
                        Lanes.Dispatch(request);
                        break;
                }
            }
        }

        /// <summary>Parses one request line (public for tests/protocol_fixtures.rs, which feeds it the golden fixture).</summary>
        public static Request Parse(byte[] line)
        {
            // Parsed from the UTF-8 bytes as they came: a request holding a 50 MB parameter is not also
            // decoded into a 100 MB UTF-16 line first. The document keeps using the array.
            var doc = JsonDocument.Parse(line, new JsonDocumentOptions { MaxDepth = Protocol.RequestDepth });
            var root = doc.RootElement;
            var request = new Request { Type = root.GetProperty("t").GetString(), Body = root };
            if (root.TryGetProperty("id", out var id) && id.ValueKind == JsonValueKind.Number) request.Id = id.GetInt64();
            if (root.TryGetProperty("runspace", out var runspace) && runspace.ValueKind == JsonValueKind.Number) request.Runspace = runspace.GetInt32();
            return request;
        }
    }

    /// <summary>Splits a stream into lines of UTF-8 bytes, each in an array of its own size.</summary>
    /// <remarks>One buffer, grown for long lines and shrunk back after them; each byte is scanned for the
    /// newline once however many reads a line takes.</remarks>
    public sealed class LineReader
    {
        private const int Initial = 64 * 1024;
        private readonly Stream stream;
        private byte[] buffer = new byte[Initial];
        private int start, end, scanned;

        public LineReader(Stream stream) { this.stream = stream; }

        /// <summary>The next line without its newline, or null at the end of the stream.</summary>
        public byte[] Next()
        {
            while (true)
            {
                int newline = Array.IndexOf(buffer, (byte)'\n', scanned, end - scanned);
                if (newline >= 0)
                {
                    var line = buffer.AsSpan(start, newline - start).ToArray();
                    start = scanned = newline + 1;
                    return line;
                }
                scanned = end;
                Compact();
                int read = stream.Read(buffer, end, buffer.Length - end);
                if (read == 0)
                {
                    if (end == start) return null;
                    var rest = buffer.AsSpan(start, end - start).ToArray();
                    start = end = scanned = 0;
                    return rest;
                }
                end += read;
            }
        }

        /// <summary>Moves the unread part to the front, growing the buffer when it is full of one line, and
        /// giving back a grown buffer once the long line is gone.</summary>
        private void Compact()
        {
            int pending = end - start;
            int size = buffer.Length;
            if (pending == size) size *= 2;
            else if (size > Initial && pending < Initial / 2) size = Initial;
            var target = size == buffer.Length ? buffer : new byte[size];
            Buffer.BlockCopy(buffer, start, target, 0, pending);
            buffer = target;
            scanned -= start;
            end = pending;
            start = 0;
        }
    }
}
