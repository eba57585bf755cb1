# A TCP listener for bindtrace's tests: listen(ADDR, PORT) and keep the socket open.
#   listener.py ADDR PORT [--v6only] [--fork N] [--reuseport K]
# --fork N: pre-fork N-1 children sharing the one listening socket (like gunicorn's workers).
# --reuseport K: K sockets on the same address with SO_REUSEPORT, one per process.
# Prints "ready <pid>..." on stdout once every socket listens; exits on SIGTERM.
import os, signal, socket, sys, time

addr, port = sys.argv[1], int(sys.argv[2])
args = sys.argv[3:]
v6only = "--v6only" in args
fork = int(args[args.index("--fork") + 1]) if "--fork" in args else 1
reuse = int(args[args.index("--reuseport") + 1]) if "--reuseport" in args else 1
family = socket.AF_INET6 if ":" in addr else socket.AF_INET

def listen():
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse > 1:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
    s.bind((addr, port))
    s.listen(64)
    return s

children = []
signal.signal(signal.SIGTERM, lambda *_: ([os.kill(c, signal.SIGTERM) for c in children], os._exit(0)))
socks = [listen()]
for _ in range(fork - 1):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        while True:
            time.sleep(3600)
    children.append(pid)
for _ in range(reuse - 1):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        mine = listen()
        os.write(w, b"x")
        while True:
            time.sleep(3600)
    os.read(r, 1)
    children.append(pid)
print("ready", os.getpid(), *children, flush=True)
while True:
    # Accept and answer, so a healthy listener really serves.
    conn, _ = socks[0].accept()
    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nok\n")
    conn.close()
