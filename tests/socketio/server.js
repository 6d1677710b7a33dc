// A Socket.IO server standing in for a game backend: it answers `whoami` with the identity
// portcullis forwarded on the handshake, and prints its port once it listens.
const http = require("node:http");
const { Server } = require("socket.io");

const httpServer = http.createServer();
const io = new Server(httpServer, { pingInterval: 1000, pingTimeout: 2000 });
io.on("connection", (socket) => {
  socket.on("whoami", (answer) =>
    answer({
      user: socket.handshake.headers["x-user-id"] ?? null,
      session: socket.handshake.headers["x-session-id"] ?? null,
      platform: socket.handshake.headers["x-session-platform"] ?? null,
      transport: socket.conn.transport.name,
    }),
  );
});
httpServer.listen(0, "127.0.0.1", () => {
  console.log(JSON.stringify({ port: httpServer.address().port }));
});
