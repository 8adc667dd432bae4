%% 1.6.0: the state of 1.1.0 (with `migrated_from`); its relup covers only
%% 1.0.0, so a node on 1.1.0 reaches it cold (state not kept).
-module(thermo_state).
-behaviour(gen_server).
-vsn("@VSN@").

-export([start_link/0, get/0, incr/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2, code_change/3]).

-record(state, {
    counter = 0 :: non_neg_integer(),
    started_at :: integer(),
    migrated_from = null :: null | binary()
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

%% OldVsn is the -vsn of the module being replaced: "1.0.0" going up; going
%% down, {down, "1.0.0"}, and this code converts before 1.0.0 loads.
code_change("1.0.0", {state, Counter, StartedAt}, _Extra) ->
    {ok, #state{counter = Counter, started_at = StartedAt, migrated_from = <<"1.0.0">>}};
code_change({down, "1.0.0"}, #state{counter = Counter, started_at = StartedAt}, _Extra) ->
    {ok, {state, Counter, StartedAt}};
code_change(_OldVsn, State = #state{}, _Extra) ->
    {ok, State}.

to_map(#state{counter = C, started_at = T, migrated_from = From}) ->
    #{counter => C, started_at => T, migrated_from => From}.
