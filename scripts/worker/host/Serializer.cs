// psbridge worker host: PowerShell objects and records to JSON.

namespace PsBridge
{
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
}
