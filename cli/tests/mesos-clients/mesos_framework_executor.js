// A Mesos executor written with mesos-framework (npm), started by Agora's agent for the tasks
// of mesoshttp_executor_scheduler.py (cli/tests/all/mesos_clients.rs). It subscribes over
// /api/v1/executor with the token the agent gave it, reports TASK_RUNNING for each task it is
// given, and once the agent has ACKNOWLEDGED that update it finishes the tasks whose data is
// "finish" (sending its framework a MESSAGE first) and keeps the others until KILL. Its last
// update for a task carries, as data, what it saw: its environment, SUBSCRIBED, its tasks and
// how many acknowledgements it had.
"use strict";

const crypto = require("crypto");
const { Executor } = require("mesos-framework");

const seen = { env: {}, subscribed: null, launched: [], killed: [], acknowledged: 0 };
for (const name of ["MESOS_FRAMEWORK_ID", "MESOS_EXECUTOR_ID", "MESOS_DIRECTORY", "MESOS_SANDBOX",
    "MESOS_CHECKPOINT", "MESOS_RECOVERY_TIMEOUT", "MESOS_SUBSCRIPTION_BACKOFF_MAX",
    "MESOS_EXECUTOR_SHUTDOWN_GRACE_PERIOD", "MESOS_AGENT_ENDPOINT"]) {
    seen.env[name] = process.env[name] || null;
}
// What to do once an update (by its uuid, in base64) is acknowledged.
const then = {};
let executor;

function update(taskId, state, next, data) {
    const uuid = crypto.randomBytes(16).toString("base64");
    const status = { task_id: { value: taskId }, state: state, source: "SOURCE_EXECUTOR", uuid: uuid };
    if (data) {
        status.data = Buffer.from(JSON.stringify(data)).toString("base64");
    }
    then[uuid] = next || null;
    executor.update(status);
}

executor = new Executor({
    handlers: {
        SUBSCRIBED: function (s) {
            seen.subscribed = {
                framework_id: s.framework_info.id.value,
                framework_name: s.framework_info.name,
                executor_id: s.executor_info.executor_id.value,
                agent_id: s.agent_info.id.value,
                agent_hostname: s.agent_info.hostname,
            };
        },
        LAUNCH: function (launch) {
            const task = launch.task;
            const id = task.task_id.value;
            seen.launched.push(id);
            const what = Buffer.from(task.data || "", "base64").toString();
            update(id, "TASK_RUNNING", function () {
                if (what === "finish") {
                    executor.message("finished " + id);
                    update(id, "TASK_FINISHED", null, seen);
                }
            });
        },
        KILL: function (kill) {
            seen.killed.push(kill.task_id.value);
            update(kill.task_id.value, "TASK_KILLED", null, seen);
        },
        ACKNOWLEDGED: function (ack) {
            seen.acknowledged += 1;
            const next = then[ack.uuid];
            delete then[ack.uuid];
            if (next) {
                next();
            }
        },
        MESSAGE: function (message) {},
        ERROR: function (error) {
            console.error("ERROR event", JSON.stringify(error));
        },
        SHUTDOWN: function (shutdown) {
            console.log("SHUTDOWN");
            process.exit(0);
        },
    },
});
executor.requestTemplate.headers.Authorization = "Bearer " + process.env.MESOS_EXECUTOR_AUTHENTICATION_TOKEN;
executor.on("error", function (e) {
    console.error("executor error", JSON.stringify(e));
});
executor.subscribe();
