// psbridge worker host: the non-interactive PowerShell host of the session.

namespace PsBridge
{
    /// <summary>
    /// The PowerShell host of one runspace (each runspace of the worker has its own, so that `exit`, host
    /// text and declined confirmations are told to the runspace they came from). Non-interactive: prompts fail with a clear message instead of
    /// blocking. Text written straight to the host (What if: lines, Out-Host) becomes Information records
    /// tagged PSHOST of the running request; records PowerShell also puts on their own streams (warnings,
    /// verbose, debug, progress, Write-Host) are not repeated here.
    /// </summary>
    public sealed class BridgeHost : PSHost
    {
        private readonly BridgeHostUI ui;
        private readonly Executor executor;
        private readonly Guid instanceId = Guid.NewGuid();

        public BridgeHost(Executor executor)
        {
            this.executor = executor;
            ui = new BridgeHostUI(executor);
        }

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
        public override void SetShouldExit(int exitCode) => executor.NoteExit(exitCode);

        /// <summary>Sends what was written without a newline at the end of a request.</summary>
        public void Flush() => ui.Flush();
    }

    public sealed class BridgeHostUI : PSHostUserInterface
    {
        private readonly StringBuilder pending = new StringBuilder();
        private readonly BridgeRawUI raw = new BridgeRawUI();
        private readonly Executor executor;

        public BridgeHostUI(Executor executor) { this.executor = executor; }

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

        private void Emit(string text)
        {
            long id = executor.CurrentId;
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
            executor.ReportDeclined(caption, message);
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
}
