"""The gRPC floor: what a Python gRPC front end costs per request before any engine work.

    python -m bench.grpc_floor --port 50051

A grpc.aio server on uvloop (as ours and the incumbent run) that parses each Generate request and answers
it at once with one GenerateComplete of `max_tokens` zero ids: no engine, no validation, no tensors
decoded. bench/side_by_side.py runs it as its fourth "server" (`floor`) with the same load driver and
requests, so its CPU per request is the part of a servicer's that the gRPC stack itself takes here.
"""

import argparse

import grpc
import uvloop

from vlm_proto import vllm_engine_pb2 as pb, vllm_engine_pb2_grpc as pb_grpc


class Floor(pb_grpc.VllmEngineServicer):
    async def Generate(self, request: pb.GenerateRequest, context):
        n = request.sampling_params.max_tokens
        yield pb.GenerateResponse(complete=pb.GenerateComplete(
            output_ids=[0] * n, finish_reason="length", prompt_tokens=len(request.tokenized.input_ids),
            completion_tokens=n))

    async def HealthCheck(self, request, context):
        return pb.HealthCheckResponse(healthy=True, message="ok")

    async def GetServerInfo(self, request, context):
        return pb.GetServerInfoResponse(server_type="grpc-floor", mm_device_do_normalize=True)


async def serve(host: str, port: int) -> None:
    limit = 256 * 1024 * 1024
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", limit)])
    pb_grpc.add_VllmEngineServicer_to_server(Floor(), server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
