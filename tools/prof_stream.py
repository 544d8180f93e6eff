"""Two processes stream a raw state dict over loopback TCP; argv[1] = recv|send|none
profiles that side with cProfile. For finding per-frame overhead."""
import multiprocessing as mp, time, cProfile, pstats, sys
sys.path.insert(0, '.')
SECRET=b"p"
def receiver(conn, params, prof):
    import asyncio, torch, llmwire
    from llmwire.cli.synthetic import llama_state_dict
    target = {k: torch.zeros_like(v) for k, v in llama_state_dict(params, seed=1).items()}
    async def main():
        done = asyncio.get_running_loop().create_future()
        async def handler(t):
            pr = cProfile.Profile()
            if prof: pr.enable()
            await llmwire.receive_state_dict(t, target)
            if prof: pr.disable(); pstats.Stats(pr).sort_stats('tottime').print_stats(12)
            await t.send_message({"ok": 1}); done.set_result(1); await t.wait_closed()
        srv = await llmwire.serve(handler, "127.0.0.1", 0, secret=SECRET)
        conn.send(srv.port); await done; await srv.close()
    llmwire.run(main())
def sender(conn, port, params, prof):
    import llmwire
    from llmwire.cli.synthetic import llama_state_dict
    sd = llama_state_dict(params, seed=1)
    async def main():
        t = await llmwire.connect("127.0.0.1", port, secret=SECRET)
        pr = cProfile.Profile()
        t0=time.perf_counter()
        if prof: pr.enable()
        await llmwire.send_state_dict(t, sd, "raw")
        await t.receive_message()
        if prof: pr.disable(); pstats.Stats(pr).sort_stats('tottime').print_stats(12)
        el=time.perf_counter()-t0; await t.close(); return el
    conn.send(llmwire.run(main()))
if __name__ == "__main__":
    ctx = mp.get_context("spawn"); params=250_000_000
    which = sys.argv[1]
    a,b = ctx.Pipe(); c,d = ctx.Pipe()
    r = ctx.Process(target=receiver, args=(b, params, which=="recv")); r.start(); port=a.recv()
    s = ctx.Process(target=sender, args=(d, port, params, which=="send")); s.start()
    el = c.recv(); print("GB/s", params*4/el/1e9); s.join(); r.join()
