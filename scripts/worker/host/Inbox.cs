// psbridge worker host: owner messages, read on a thread of their own.

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
}
