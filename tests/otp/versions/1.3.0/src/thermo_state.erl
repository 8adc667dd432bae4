%% 1.3.0: the base state server, except that its state migration crashes,
%% which makes release_handler:install_release/1 fail after the point of no
%% return (the node then restarts itself on its permanent release).
-module(thermo_state).
-behaviour(gen_server).
-vsn("@VSN@").

-export([start_link/0, get/0, incr/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2, code_change/3]).

-record(state, {
    counter = 0 :: non_neg_integer(),
    started_at :: integer()
}).

start_link() ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

-spec get() -> map().
get() ->
    gen_server:call(?MODULE, get).

-spec incr() -> map().
incr() ->
    gen_server:call(?MODULE, incr).

init([]) ->
    {ok, #state{started_at = erlang:system_time(second)}}.

handle_call(get, _From, State) ->
    {reply, to_map(State), State};
handle_call(incr, _From, State = #state{counter = C}) ->
    New = State#state{counter = C + 1},
    {reply, to_map(New), New};
handle_call(_Other, _From, State) ->
    {reply, {error, unknown_call}, State}.

handle_cast(_Msg, State) ->
    {noreply, State}.

handle_info(_Msg, State) ->
    {noreply, State}.

terminate(_Reason, _State) ->
    ok.

code_change("1.0.0", _State, _Extra) ->
    erlang:error(simulated_migration_bug);
code_change(_OldVsn, State, _Extra) ->
    {ok, State}.

to_map(#state{counter = C, started_at = T}) ->
    #{counter => C, started_at => T}.
