// psbridge worker host: the runspaces of the worker and which one each request goes to.

namespace PsBridge
{
    /// <summary>
    /// The worker's runspaces ("lanes"): runspace 0 exists from the start and runs on the worker's main
    /// thread; a `setup` naming another index creates that runspace with a thread of its own. Each runs its
    /// own requests in order; different runspaces run at the same time. Request ids are unique per worker,
    /// so a cancel finds its request in whichever runspace runs it.
    /// </summary>
    public static class Lanes
    {
        /// <summary>The most runspaces one worker hosts (indexes 0 to 63).</summary>
        public const int MaxRunspaces = 64;

        private static readonly object Gate = new object();
        private static readonly Executor[] Executors = new Executor[MaxRunspaces];

        static Lanes()
        {
            Executors[0] = new Executor(0);
        }

        /// <summary>Queues a setup or invoke on the runspace it names (inbox thread).</summary>
        public static void Dispatch(Request request)
        {
            int index = request.Runspace;
            if (index < 0 || index >= MaxRunspaces)
            {
                Executor.Refuse(request, "runspace " + index + " does not exist: a worker hosts runspaces 0 to " + (MaxRunspaces - 1));
                return;
            }
            Executor lane;
            lock (Gate)
            {
                lane = Executors[index];
                if (lane == null && request.Type == "setup")
                {
                    lane = Executors[index] = new Executor(index);
                    lane.StartThread();
                }
            }
            if (lane == null) Executor.Refuse(request, "runspace " + index + " has not been set up");
            else lane.Enqueue(request);
        }

        /// <summary>Stops request `id` if some runspace is running it (inbox thread, under Inbox.CancelGate).</summary>
        public static bool StopIfRunning(long id)
        {
            foreach (var lane in All())
            {
                if (lane.StopIfRunning(id)) return true;
            }
            return false;
        }

        /// <summary>The owner said exit: every runspace ends once the requests queued before it are done.</summary>
        public static void Exit()
        {
            foreach (var lane in All()) lane.Enqueue(new Request { Type = "exit" });
        }

        /// <summary>Runs runspace 0 on the calling (main) thread until exit, then waits for the others.</summary>
        public static void Run()
        {
            Executors[0].Loop();
            foreach (var lane in All()) lane.Join();
        }

        public static void Close()
        {
            foreach (var lane in All()) lane.Close();
        }

        private static List<Executor> All()
        {
            lock (Gate)
            {
                var lanes = new List<Executor>();
                foreach (var lane in Executors) if (lane != null) lanes.Add(lane);
                return lanes;
            }
        }
    }
}
