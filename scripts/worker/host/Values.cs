// psbridge worker host: protocol parameter values to the .NET values cmdlets bind to.

namespace PsBridge
{
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
}
