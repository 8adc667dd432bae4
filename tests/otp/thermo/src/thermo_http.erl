%% A minimal HTTP/1.1 server on gen_tcp, bound to 127.0.0.1.
%%
%% This gen_server owns the listen socket and keeps exactly one acceptor
%% process alive. An acceptor that gets a connection tells the server, which
%% starts the next acceptor, and then serves that one connection itself.
%%
%% Hot upgrades: an acceptor blocked in accept/2 runs the code of the release
%% it was started in, so the relup's purge of that code kills it (trap 5 in
%% the notes). The server traps exits and replaces a dead acceptor at once,
%% with one running the current code; the listen socket, and the connections
%% queued on it, belong to the server and survive. The server itself sits in
%% gen_server's loop between messages, so it never runs purged code.
-module(thermo_http).
-behaviour(gen_server).
-vsn("@VSN@").

-export([start_link/0, port/0]).
%% Process entry points, called fully qualified so that they run the newest
%% loaded code.
-export([accept/2, serve/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2, code_change/3]).

-define(RECV_TIMEOUT, 5000).
-define(MAX_BODY, 65536).

-record(st, {lsock :: gen_tcp:socket(), port :: inet:port_number(), acceptor :: pid()}).

start_link() ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

-spec port() -> inet:port_number().
port() ->
    gen_server:call(?MODULE, port).

init([]) ->
    process_flag(trap_exit, true),
    Port = configured_port(),
    Opts = [binary, {ip, {127, 0, 0, 1}}, {active, false}, {reuseaddr, true}, {backlog, 128}],
    case gen_tcp:listen(Port, Opts) of
        {ok, LSock} ->
            logger:notice("thermo_http listening on 127.0.0.1:~b", [Port]),
            {ok, start_acceptor(#st{lsock = LSock, port = Port})};
        {error, Reason} ->
            {stop, {listen_failed, Port, Reason}}
    end.

handle_call(port, _From, St) ->
    {reply, St#st.port, St};
handle_call(_Other, _From, St) ->
    {reply, {error, unknown_call}, St}.

handle_cast(_Msg, St) ->
    {noreply, St}.

handle_info({accepted, Pid}, St = #st{acceptor = Pid}) ->
    %% The connection's fate is no longer ours to care about.
    unlink(Pid),
    {noreply, start_acceptor(St)};
handle_info({'EXIT', Pid, Reason}, St = #st{acceptor = Pid}) ->
    %% Killed by a code purge, or accept failed: replace it.
    logger:notice("thermo_http acceptor ~p exited (~p), starting a new one", [Pid, Reason]),
    {noreply, start_acceptor(St)};
handle_info({'EXIT', _Other, _Reason}, St) ->
    %% A connection process that exited before we unlinked it.
    {noreply, St};
handle_info(_Msg, St) ->
    {noreply, St}.

terminate(_Reason, #st{lsock = LSock}) ->
    gen_tcp:close(LSock).

code_change(_OldVsn, St, _Extra) ->
    {ok, St}.

start_acceptor(St = #st{lsock = LSock}) ->
    Pid = proc_lib:spawn_link(thermo_http, accept, [LSock, self()]),
    St#st{acceptor = Pid}.

configured_port() ->
    case os:getenv("THERMO_HTTP_PORT") of
        false ->
            application:get_env(thermo, http_port, 8081);
        Value ->
            list_to_integer(string:trim(Value))
    end.

%% --- acceptor / connection process ---

accept(LSock, Server) ->
    case gen_tcp:accept(LSock) of
        {ok, Sock} ->
            Server ! {accepted, self()},
            %% A tail call: nothing of this module's current version stays on
            %% the stack while the connection is served.
            thermo_http:serve(Sock);
        {error, closed} ->
            exit(normal);
        {error, Reason} ->
            exit({accept_failed, Reason})
    end.

serve(Sock) ->
    {Status, Body} =
        case read_request(Sock) of
            {ok, Method, Path} ->
                try
                    thermo_api:handle(Method, Path)
                catch
                    Class:Reason:Stack ->
                        logger:error("thermo_http handler crashed: ~p:~p ~p", [Class, Reason, Stack]),
                        {500, #{error => <<"internal error">>}}
                end;
            {error, Reason} ->
                {400, #{error => iolist_to_binary(io_lib:format("bad request: ~p", [Reason]))}}
        end,
    Json = thermo_api:encode_json(Body),
    Response = [
        <<"HTTP/1.1 ">>, integer_to_binary(Status), <<" ">>, reason_phrase(Status), <<"\r\n">>,
        <<"Content-Type: application/json\r\n">>,
        <<"Content-Length: ">>, integer_to_binary(iolist_size(Json)), <<"\r\n">>,
        <<"Connection: close\r\n\r\n">>,
        Json
    ],
    _ = gen_tcp:send(Sock, Response),
    gen_tcp:close(Sock).

%% Request line and headers through the VM's HTTP packet parser, then the
%% body (if any) is read and dropped: closing a socket with unread input
%% sends a RST, which can destroy the response before the client reads it.
read_request(Sock) ->
    ok = inet:setopts(Sock, [{packet, http_bin}]),
    case gen_tcp:recv(Sock, 0, ?RECV_TIMEOUT) of
        {ok, {http_request, Method, {abs_path, Path}, _Version}} ->
            case read_headers(Sock, 0) of
                {ok, Length} when Length =< ?MAX_BODY ->
                    case drain_body(Sock, Length) of
                        ok -> {ok, Method, strip_query(Path)};
                        Error -> Error
                    end;
                {ok, _TooLong} ->
                    {error, body_too_large};
                Error ->
                    Error
            end;
        {ok, Other} ->
            {error, {unexpected, Other}};
        {error, _} = Error ->
            Error
    end.

read_headers(Sock, Length) ->
    case gen_tcp:recv(Sock, 0, ?RECV_TIMEOUT) of
        {ok, {http_header, _, 'Content-Length', _, Value}} ->
            try binary_to_integer(string:trim(Value)) of
                N when N >= 0 -> read_headers(Sock, N);
                _ -> {error, bad_content_length}
            catch
                error:badarg -> {error, bad_content_length}
            end;
        {ok, {http_header, _, _, _, _}} ->
            read_headers(Sock, Length);
        {ok, http_eoh} ->
            {ok, Length};
        {ok, Other} ->
            {error, {unexpected, Other}};
        {error, _} = Error ->
            Error
    end.

drain_body(_Sock, 0) ->
    ok;
drain_body(Sock, Length) ->
    ok = inet:setopts(Sock, [{packet, raw}]),
    case gen_tcp:recv(Sock, Length, ?RECV_TIMEOUT) of
        {ok, _} -> ok;
        {error, _} = Error -> Error
    end.

strip_query(Path) ->
    hd(binary:split(Path, <<"?">>)).

reason_phrase(200) -> <<"OK">>;
reason_phrase(400) -> <<"Bad Request">>;
reason_phrase(404) -> <<"Not Found">>;
reason_phrase(405) -> <<"Method Not Allowed">>;
reason_phrase(500) -> <<"Internal Server Error">>;
reason_phrase(503) -> <<"Service Unavailable">>;
reason_phrase(_) -> <<"Unknown">>.
