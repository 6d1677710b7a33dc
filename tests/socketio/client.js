// A Socket.IO client as a game would run it: node client.js URL [TOKEN]. It connects (long
// polling first, then the upgrade to WebSocket), asks `whoami` once upgraded, then stays
// connected until the server side goes away. Each event is printed as one JSON line.
const { io } = require("socket.io-client");

const [url, token] = process.argv.slice(2);
const print = (event) => process.stdout.write(JSON.stringify(event) + "\n");
const socket = io(url, {
  extraHeaders: token ? { authorization: `Bearer ${token}` } : {},
  reconnection: false,
  timeout: 5000,
});
socket.on("connect_error", (error) => {
  print({ event: "connect_error", message: error.message, status: error.description ?? null });
  process.exit(0);
});
socket.on("disconnect", (reason) => {
  print({ event: "disconnect", reason });
  process.exit(0);
});
// The connection opens on the first transport (long polling), then upgrades.
socket.io.on("open", () => {
  const engine = socket.io.engine;
  print({ event: "open", transport: engine.transport.name });
  engine.once("upgrade", (transport) => print({ event: "upgrade", transport: transport.name }));
});
socket.on("connect", () => {
  const engine = socket.io.engine;
  print({ event: "connect", transport: engine.transport.name });
  const ask = () =>
    socket.emit("whoami", (answer) =>
      print({ event: "whoami", ...answer, client_transport: engine.transport.name }),
    );
  if (engine.transport.name === "websocket") ask();
  else engine.once("upgrade", ask);
});
// Bounded: a test that waits for nothing more still ends.
setTimeout(() => {
  print({ event: "timeout" });
  process.exit(1);
}, 15000).unref();
