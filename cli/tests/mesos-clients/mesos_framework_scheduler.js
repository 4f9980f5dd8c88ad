// A Mesos framework written with mesos-framework (npm), run against an Agora master by
// cli/tests/all/mesos_clients.rs.
//
// The library launches the configured tasks on the offers it gets (here two instances of a
// command that needs a port), declines what it does not need, and acknowledges through the
// UPDATE handler below. Once both tasks have ended it tears the framework down. The last line
// it prints is RESULT and a JSON summary.
"use strict";

const { Scheduler, Mesos } = require("mesos-framework");
const mesos = Mesos.getMesos();

const [host, port] = process.argv[2].split(":");
const TERMINAL = new Set(["TASK_FINISHED", "TASK_FAILED", "TASK_KILLED", "TASK_ERROR", "TASK_LOST", "TASK_DROPPED"]);
const ends = {};
const updates = [];
const errors = [];
let finished = false;

const scheduler = new Scheduler({
    masterUrl: host,
    port: Number(port),
    frameworkName: "mesos-framework-test",
    // The library sends "root" when no user is given, which Agora refuses by default.
    user: "nobody",
    logging: { level: "warn" },
    restartStates: [],
    tasks: {
        hello: {
            priority: 1,
            instances: 2,
            commandInfo: new mesos.CommandInfo(null, null, true, "echo hello from mesos-framework on port $PORT0", null, null),
            resources: { cpus: 0.1, mem: 32, ports: 1, disk: 0 },
        },
    },
    handlers: {
        UPDATE: function (update) {
            this.acknowledge(update);
            const status = update.status;
            updates.push([status.task_id.value, status.state, status.message || ""]);
            if (TERMINAL.has(status.state)) {
                ends[status.task_id.value] = status.state;
                if (Object.keys(ends).length === 2) {
                    finish(true);
                }
            }
        },
    },
});

function finish(ok) {
    if (finished) {
        return;
    }
    finished = true;
    scheduler.teardown();
    console.log("RESULT " + JSON.stringify({ finished: ok, ends, updates, errors, framework_id: scheduler.frameworkId }));
    setTimeout(() => process.exit(ok ? 0 : 1), 500);
}

scheduler.on("ready", () => scheduler.subscribe());
scheduler.on("subscribed", (s) => console.log("SUBSCRIBED " + s.frameworkId));
scheduler.on("error", (e) => errors.push(String(e && e.message ? e.message : JSON.stringify(e))));
setTimeout(() => finish(false), 60000);
