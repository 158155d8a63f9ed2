// psbridge worker host: the namespaces every file of host/ uses, once (Add-Type compiles the files together).

global using System;
global using System.Buffers;
global using System.Collections;
global using System.Collections.Concurrent;
global using System.Collections.Generic;
global using System.Collections.ObjectModel;
global using System.Diagnostics;
global using System.Globalization;
global using System.IO;
global using System.Management.Automation;
global using System.Management.Automation.Host;
global using System.Management.Automation.Runspaces;
global using System.Runtime.InteropServices;
global using System.Security;
global using System.Text;
global using System.Text.Encodings.Web;
global using System.Text.Json;
global using System.Threading;
global using Microsoft.PowerShell.Commands;
global using Microsoft.Win32.SafeHandles;
